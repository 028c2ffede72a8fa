"""torch.compile for a cell (``--compile``, worker side): the compiled module, what the
compiler did, and what the compilation cost.

The first warm-up step runs uncompiled: it carries the checkpointing evidence's hooks,
which would otherwise be traced into the graph (or break it); the hooks come off after it
(``Evidence.stop``). The second warm-up step compiles; ``compile_s`` is its time minus
the median of the later steps, so the measured steps never include compilation (a
recompilation during them is counted and warned about). Dynamo's counters are
process-wide: the cell reads their change from before the compile.

Counters (torch 2.11 on the GPU host and 2.13 here; ``torch._dynamo.utils``):
``counters["frames"]["total" / "ok"]``, ``counters["stats"]["unique_graphs"]``,
``counters["graph_break"]`` (reason -> count), ``counters["inductor"]["fxgraph_cache_hit" /
"fxgraph_cache_miss"]``; recompilations are the entries of ``get_compilation_metrics()``
with a ``recompile_reason`` (there is no counter for them).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from harness.cell.stacks.base import StackProofError

BACKEND = "inductor"


def _counts() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {"frames_total": int(counters["frames"]["total"]), "frames_ok": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": Counter({str(k): int(v) for k, v in counters["graph_break"].items()}),
            "fxgraph_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fxgraph_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def _recompiles() -> int:
    from torch._dynamo import utils

    return sum(getattr(m, "recompile_reason", None) is not None for m in utils.get_compilation_metrics())


class CompileWatch:
    """The compiled module of a cell and the compiler's counters around it."""

    def __init__(self, module) -> None:
        import torch
        from torch._dynamo import utils

        clear = getattr(utils, "clear_compilation_metrics", None)
        if clear is not None:  # a deque of 64: start it empty so the cell's entries are its own
            clear()
        self.before = _counts()
        self.recompiles_before = _recompiles()
        self.recompiles_at_window: int | None = None
        self.recompiles_in_window = 0
        self.eager = module
        self.compiled = torch.compile(module, backend=BACKEND)

    def module(self, step: int):
        """The module step ``step`` calls: uncompiled for the first."""
        return self.eager if step == 0 else self.compiled

    def measured_start(self) -> None:
        self.recompiles_at_window = _recompiles()

    def window_end(self) -> None:
        if self.recompiles_at_window is not None:
            self.recompiles_in_window = _recompiles() - self.recompiles_at_window

    def finish(self, times: list[float], out: dict[str, Any]) -> None:
        """The counters and the compile time into ``out``; raises StackProofError when no
        frame was compiled (the cell ran eagerly)."""
        now = _counts()
        delta = {k: now[k] - self.before[k] for k in now if k != "graph_breaks"}
        breaks = now["graph_breaks"] - self.before["graph_breaks"]
        reasons = Counter()
        for reason, n in breaks.items():
            reasons[(reason.strip().splitlines() or ["?"])[0][:160]] += n
        out["compile_counters"] = dict(backend=BACKEND, **delta, graph_breaks=int(sum(breaks.values())),
                                       graph_break_reasons=dict(reasons.most_common(5)),
                                       recompiles=_recompiles() - self.recompiles_before,
                                       recompiles_measured=self.recompiles_in_window)
        if len(times) > 2:  # step 0 ran uncompiled, step 1 compiled, the rest show a step's own time
            out["compile_first_step_s"] = times[1]
            out["compile_s"] = max(0.0, times[1] - statistics.median(times[2:]))
        if delta["frames_ok"] < 1:
            raise StackProofError(f"compile proof failed: torch._dynamo compiled no frame "
                                  f"({delta['frames_total']} handed to it): the cell ran eagerly")
        if out["compile_counters"]["recompiles_measured"]:
            out.setdefault("warnings", []).append(
                f"{out['compile_counters']['recompiles_measured']} recompilation(s) during the measured steps: "
                "their compile time is in the measured step times")
