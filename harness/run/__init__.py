"""Running cells from the parent process (imports no torch):

- ``sweep``: the sweep and the three steps of a cell (decide, launch, record);
- ``executors``: how cells are spread over lanes (serial; ``pool``: over GPUs);
- ``launch``: the launcher interface and the fork launcher; ``forkserver``: its server's
  parent side; ``torchrun``: cells over several GPUs;
- ``progress``: the progress line.

``open_sweep`` is how the front-ends (the CLI, the pytest plugin) open a sweep.
"""

from __future__ import annotations

from typing import Any


def open_sweep(config: Any, facts: dict[str, Any], **kwargs: Any) -> Any:
    """A sweep (``harness.run.sweep.Sweep``) with the executor the options ask for:
    ``--gpus``, over those GPUs; else serial. ``kwargs``: the sweep's (command, out, total)."""
    from harness.run.sweep import Sweep

    return Sweep(config, facts, executor=executor_for(config), **kwargs)


def executor_for(config: Any) -> Any:
    """The executor a sweep config (``harness.plan.options.SweepConfig``) asks for."""
    if config.gpus:
        from harness.run.pool import GpuPool

        return GpuPool(config.gpus)
    from harness.run.executors import SerialExecutor

    return SerialExecutor()
