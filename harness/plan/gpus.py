"""Which GPUs a sweep may use (``--gpus``) and how a worker is pinned to one. Pure module:
no torch, no NVML calls of its own (the GPU list comes from ``harness.core.host.quick_facts``).

A *slot* is one physical GPU: its NVML index (what ``nvidia-smi`` shows), its UUID and its
name. A worker server pinned to a slot starts with ``CUDA_VISIBLE_DEVICES=<UUID>``, so CUDA
sees that one device as ``cuda:0`` whatever order CUDA and NVML number devices in, and the
worker's NVML sampler finds the same device by its UUID
(``harness.cell.trackers.memory.nvml_index_for_visible_device``): a cell pinned to GPU 1 reads
GPU 1's memory and energy, never GPU 0's.

Fake GPUs (tests): with ``LORA_HARNESS_FAKE_GPUS=N`` on a host where NVML sees no GPU, the
parent believes there are N GPUs. Worker servers are started and pinned exactly as on a
GPU host (``CUDA_VISIBLE_DEVICES=<index>``: a fake GPU has no UUID CUDA would accept),
while their cells run on the CPU. The pool, the pinning environment each worker sees, the
record fields and failure isolation are thereby exercised with real cells and processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from harness.plan.matrix import split_list
from harness.core.errors import SpecError

FAKE_ENV = "LORA_HARNESS_FAKE_GPUS"
FAKE_NAME = "fake GPU (cells run on the CPU)"


@dataclass(frozen=True)
class GpuSlot:
    index: int  # NVML index: the physical GPU, as nvidia-smi numbers it
    uuid: str | None
    name: str
    fake: bool = False

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    def pin_env(self) -> dict[str, str]:
        """Environment of the worker server (and so of every cell it forks) for this GPU."""
        visible = self.uuid if (self.uuid and not self.fake) else str(self.index)
        env = {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
               "LORA_HARNESS_GPU_INDEX": str(self.index)}
        if self.uuid:
            env["LORA_HARNESS_GPU_UUID"] = self.uuid
        return env

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "fake": self.fake}


def fake_count() -> int:
    raw = os.environ.get(FAKE_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        raise SpecError(f"{FAKE_ENV}={raw!r}: give a number of fake GPUs") from None
    return max(0, n)


def host_gpus(facts: dict[str, Any]) -> list[GpuSlot]:
    """The GPUs NVML reports (``facts['gpus']``); fake ones only where there are none."""
    real = [GpuSlot(int(g["index"]), g.get("uuid"), str(g.get("name") or "?")) for g in facts.get("gpus") or []]
    if real:
        return real
    return [GpuSlot(i, f"FAKE-GPU-{i}", FAKE_NAME, fake=True) for i in range(fake_count())]


def parse_gpus(value: Any, facts: dict[str, Any], device: str = "auto") -> tuple[GpuSlot, ...]:
    """``--gpus`` -> the slots to use, in the order given; () without the option.

    ``all`` is every GPU; otherwise a comma list of NVML indexes (``0,1``). Errors are one
    line for the user: no GPU on this host, an index that does not exist, a repeat, or
    ``--device cpu`` together with ``--gpus``.
    """
    if value in (None, "", False):
        return ()
    text = str(value).strip().lower()
    if device == "cpu":
        raise SpecError("--gpus pins cells to GPUs and --device cpu runs them on the CPU: give one or the other")
    avail = host_gpus(facts)
    if not avail:
        why = facts.get("nvml_error") or "NVML reports no device"
        raise SpecError(f"no GPU found on this host ({why}): --gpus needs NVIDIA GPUs")
    by_index = {g.index: g for g in avail}
    if text == "all":
        return tuple(avail)
    out: list[GpuSlot] = []
    for item in split_list(text):
        try:
            i = int(item)
        except ValueError:
            raise SpecError(f"--gpus: {item!r} is not a GPU index (give e.g. 0,1 or all)") from None
        if i not in by_index:
            have = ", ".join(str(k) for k in sorted(by_index))
            raise SpecError(f"--gpus: GPU {i} does not exist on this host (GPUs: {have})")
        if by_index[i] in out:
            raise SpecError(f"--gpus: GPU {i} is given twice")
        out.append(by_index[i])
    if not out:
        raise SpecError("--gpus: no GPU index given (e.g. 0,1 or all)")
    return tuple(out)
