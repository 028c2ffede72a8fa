"""Which charts a report shows, group by group, in reading order."""

from __future__ import annotations

from typing import Callable, Iterator

import pandas as pd

from harness.report import chart_matrix, chart_scaling, chart_stacks
from harness.report.charts import Chart, Group, groups, stack_groups


def all_charts(cells: pd.DataFrame) -> Iterator[Chart]:
    """Every chart the report shows, group by group, in reading order."""
    makers: tuple[Callable[[Group], Chart | None], ...] = (
        chart_matrix.status_grid, chart_scaling.memory_chart, chart_scaling.throughput_chart,
        chart_scaling.checkpointing_tradeoff, chart_matrix.loss_curves,
    )
    for g in groups(cells):
        for make in makers:
            chart = make(g)
            if chart is not None:
                yield chart
    for g in stack_groups(cells):  # across stacks: cells that differ only by their stack
        chart = chart_stacks.stack_chart(g)
        if chart is not None:
            yield chart
