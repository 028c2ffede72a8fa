"""Running cells from the parent process (imports no torch):

- ``sweep``: the sweep and the three steps of a cell (decide, launch, record);
- ``executors``: how cells are spread over lanes (serial; ``pool``: over GPUs);
- ``launch``: the launcher interface and the fork launcher; ``forkserver``: its server's
  parent side; ``torchrun``: cells over several GPUs;
- ``progress``: the progress line.

``open_sweep`` is how the front-ends (the CLI, the pytest plugin) open a sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.plan.options import SweepConfig
    from harness.run.sweep import Sweep


def open_sweep(config: "SweepConfig", facts: dict[str, Any], **kwargs: Any) -> "Sweep":
    """A sweep with the executor the options ask for (``--gpus``: over those GPUs, else
    serial). ``kwargs``: ``Sweep``'s (command, out, total)."""
    from harness.run.executors import executor_for
    from harness.run.sweep import Sweep

    return Sweep(config, facts, executor=executor_for(config), **kwargs)
