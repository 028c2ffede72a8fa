"""lora-harness: real LoRA training cells over precision x sequence length x gradient
checkpointing, measured, isolated and stored.

The parent side (spec, matrix, options, runner, store, sweep, result, tables) imports no
torch; the worker side (workload, models.build, checkpointing, trackers, env.collect)
does, and runs in the worker processes only.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``harness.load_runs(paths)`` -> a DataFrame of run folders (harness.report.load),
    imported on first use so that ``import harness`` stays free of pandas."""
    if name in ("load_runs", "load_run_set"):
        from harness.report import load

        return getattr(load, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
