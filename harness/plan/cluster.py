"""``--ray``: which Ray cluster a sweep's cells go to. Pure module (it only asks whether the
``ray`` package is installed; connecting is ``harness.run.ray_executor``'s).

    --ray auto            the cluster this machine belongs to (``ray start`` ran here, or RAY_ADDRESS)
    --ray ADDRESS         e.g. ``10.0.0.5:6379`` (a head node's GCS) or ``ray://head:10001`` (Ray Client)
    --ray local[:N]       a one-node cluster started by this process with N GPUs (default 2): on a
                          host without GPUs they are fake and the cells run on the CPU

The checks here need no cluster, so a wrong combination is refused before anything
connects: ``--gpus`` (this host's GPUs; Ray hands out the cluster's) and ``--world-size``
above 1 (a torchrun cell needs several GPUs of one host, Ray gives each worker one).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Mapping

from harness.core.errors import SpecError
from harness.plan.matrix import split_list

INSTALL_HINT = "pip install -e .[ray]"
DEFAULT_LOCAL_GPUS = 2


@dataclass(frozen=True)
class RayTarget:
    """Where ``--ray`` points: an address for ``ray.init``, or a local cluster to start."""

    text: str  # as given (run.json's options keep it)
    address: str | None = None  # "auto" or an address; None: start a local cluster
    local_gpus: int = 0  # local cluster: its GPUs

    @property
    def local(self) -> bool:
        return self.address is None

    def describe(self) -> str:
        if self.local:
            return f"a local Ray cluster with {self.local_gpus} GPU(s)"
        return "the Ray cluster of this machine" if self.address == "auto" else f"the Ray cluster at {self.address}"


def _value(values: Mapping[str, Any], name: str) -> Any:
    """An option by ``Opt.dest`` (lh_world_size), name (world-size) or keyword (world_size)."""
    for key in ("lh_" + name.replace("-", "_"), name, name.replace("-", "_")):
        if values.get(key) is not None:
            return values[key]
    return None


def ray_target(values: Mapping[str, Any]) -> RayTarget | None:
    """``--ray`` from the options (keyed by ``Opt.dest`` or plain name) -> a target, or None
    without the option. Errors are one line: ray not installed, a bad value, ``--gpus`` or
    ``--world-size`` above 1 beside it."""
    raw = _value(values, "ray")
    if raw in (None, "", False):
        return None
    text = str(raw).strip()
    if _value(values, "gpus") not in (None, "", False):
        raise SpecError("--ray runs cells on the Ray cluster's GPUs and --gpus on this host's: give one or the other")
    try:
        sizes = [int(w) for w in split_list(_value(values, "world-size"))]
    except ValueError:
        sizes = []  # build_config names the bad value
    if any(w > 1 for w in sizes):
        raise SpecError("--ray gives each cell one GPU of the cluster; cells with --world-size above 1 need torchrun "
                        "on one host: run them in a separate sweep without --ray")
    name, _, count = text.partition(":")
    if name.lower() == "local":
        n = DEFAULT_LOCAL_GPUS
        if count:
            try:
                n = int(count)
            except ValueError:
                n = 0
            if n < 1:
                raise SpecError(f"--ray {text}: local:N needs a number of GPUs of at least 1 (e.g. local:2)")
        target = RayTarget(text, None, n)
    elif not text or text.lower().startswith("local"):
        raise SpecError(f"--ray {text!r}: give auto, an address (host:6379, ray://host:10001) or local[:N]")
    else:
        target = RayTarget(text, "auto" if text.lower() == "auto" else text)
    # last, so that a bad value is named whether or not ray is installed here
    if importlib.util.find_spec("ray") is None:
        raise SpecError(f"--ray needs the ray package, which is not installed: {INSTALL_HINT}")
    return target
