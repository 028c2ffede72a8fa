"""Running cells from the parent process (imports no torch):

- ``sweep``: the sweep and the three steps of a cell (decide, launch, record);
- ``executors``: how cells are spread over lanes (serial; ``pool``: over GPUs;
  ``remote`` / ``ray_executor`` / ``ray_node``: over the GPUs of a Ray cluster);
- ``launch``: the launcher interface and the fork launcher; ``forkserver``: its server's
  parent side; ``torchrun``: cells over several GPUs;
- ``progress``: the progress line.

``open_sweep`` is how the front-ends (the CLI, the pytest plugin) open a sweep, and
``sweep_facts`` the host facts they judge its options by.
"""

from __future__ import annotations

from typing import Any


def open_sweep(config: Any, facts: dict[str, Any], **kwargs: Any) -> Any:
    """A sweep (``harness.run.sweep.Sweep``) with the executor the options ask for:
    ``--gpus``, over those GPUs; ``--ray``, over a Ray cluster's; else serial. ``kwargs``:
    the sweep's (command, out, total)."""
    from harness.run.sweep import Sweep

    return Sweep(config, facts, executor=executor_for(config), **kwargs)


def executor_for(config: Any) -> Any:
    """The executor a sweep config (``harness.plan.options.SweepConfig``) asks for."""
    if getattr(config, "ray", None) is not None:
        from harness.run.ray_executor import RayExecutor

        return RayExecutor(config.ray)
    if config.gpus:
        from harness.run.pool import GpuPool

        return GpuPool(config.gpus)
    from harness.run.executors import SerialExecutor

    return SerialExecutor()


def sweep_facts(values: dict[str, Any]) -> dict[str, Any]:
    """The host facts a sweep's options (``Opt.dest`` or name keys) are judged by: this
    host's; with ``--ray``, a GPU node's of the cluster (the driver may have no GPU)."""
    from harness.core.host import quick_facts
    from harness.plan.cluster import ray_target

    target = ray_target(values)
    if target is None:
        return quick_facts()
    from harness.run.ray_executor import cluster_facts

    return cluster_facts(target)
