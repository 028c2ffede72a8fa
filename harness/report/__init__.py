"""The reporter: run folders -> DataFrames -> charts, tables and report pages.

Parent side: pandas and matplotlib, never torch. ``load_runs`` is the entry point for
people working in Python; ``build_report`` writes report.md / report.html.
"""

from harness.report.load import RunLoadError, RunSet, load_run_set, load_runs

__all__ = ["RunLoadError", "RunSet", "load_run_set", "load_runs"]
