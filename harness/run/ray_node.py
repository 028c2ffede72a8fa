"""The node side of ``--ray``: what runs inside a Ray actor on a GPU node (``GpuWorker``) and
the facts task (``node_facts``). Plain Python: ``harness.run.ray_executor`` wraps them with
``ray.remote``, so Ray imports this module by name on every node (the harness must be
importable there). Imports no torch; ray only inside the actor's calls.

A worker owns the one GPU Ray gave its actor (``ray.get_gpu_ids()``, which Ray also put in
``CUDA_VISIBLE_DEVICES``). Its fork server is pinned to that GPU the way the GPU pool pins
one (``harness.plan.gpus.GpuSlot.pin_env``: ``CUDA_VISIBLE_DEVICES=<UUID>``, devices in PCI
order), so each cell's NVML figures are that GPU's. On a node where NVML sees no GPU (a
local cluster started with fake GPUs) the slot is fake, as with ``LORA_HARNESS_FAKE_GPUS``:
the server is pinned to the fake index and the cells run on the CPU.

Cells run one at a time, each in its own process forked by the server, exactly as on one
host; their logs are written to a folder of the node and sent back with the result (the
driver writes them into the run folder). The actor dying takes its fork server with it
(the server kills its cells when its input closes); a fork server dying under a cell is
reported as ``lost`` and its orphaned cell is killed, so the driver runs the cell again
rather than recording a crash that was not the cell's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from harness.core.host import nvml_gpus, quick_facts
from harness.plan.gpus import FAKE_NAME, GpuSlot
from harness.run.launch import CELL_TARGET, ForkLauncher, launched_from

LOG_LIMIT = 8 * 1024 * 1024  # bytes of a log sent back (its end: where the error is)


def node_facts() -> dict[str, Any]:
    """This node's host facts (the capability rules judge cells by them)."""
    return quick_facts()


def slot_for(gpu_id: str, gpus: list[dict[str, Any]]) -> GpuSlot:
    """The GPU behind a Ray GPU id: a UUID, or an index in PCI order (NVML's numbering:
    the fork server sets CUDA_DEVICE_ORDER=PCI_BUS_ID). No NVML GPU: a fake one."""
    for g in gpus:
        if gpu_id in (str(g.get("uuid")), str(g.get("index"))):
            return GpuSlot(int(g["index"]), g.get("uuid"), str(g.get("name") or "?"))
    if gpus:
        raise RuntimeError(f"Ray gave GPU {gpu_id}, which NVML does not list on {socket.gethostname()}")
    index = int(gpu_id) if gpu_id.isdigit() else 0
    return GpuSlot(index, f"FAKE-GPU-{index}", FAKE_NAME, fake=True)


def _take_log(path: Path) -> str:
    """A log's text (its end when long), the file removed: the driver keeps the copy."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_LIMIT))
            data = f.read()
        path.unlink()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return text if size <= LOG_LIMIT else f"[first {size - LOG_LIMIT} bytes left on the node]\n" + text


class GpuWorker:
    """One GPU of a node: a fork server pinned to it, cells one at a time (a Ray actor)."""

    def __init__(self) -> None:
        self.slot: GpuSlot | None = None
        self.dir: Path | None = None
        self.launcher: ForkLauncher | None = None
        self.label = socket.gethostname()

    def start(self, gpu_ids: list[str] | None = None) -> dict[str, Any]:
        """Pin to the GPU Ray gave this actor and start the fork server; what the driver
        records about this worker."""
        import ray

        ids = [str(i) for i in (gpu_ids if gpu_ids is not None else ray.get_gpu_ids())]
        if len(ids) != 1:
            raise RuntimeError(f"a worker needs exactly one GPU from Ray, got {ids or 'none'}")
        gpus, _, _ = nvml_gpus()
        self.slot = slot_for(ids[0], gpus)
        self.label = f"{socket.gethostname()}:{self.slot.label}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"lora-harness-{self.slot.label}-"))
        self.launcher = ForkLauncher(self.dir, env=self.slot.pin_env())
        ready = self.launcher.start()
        ctx = ray.get_runtime_context()
        return {"ready": ready, "label": self.label, "node": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "gpu_id": ids[0],
                "slot": self.slot.to_dict(), "pid": os.getpid(), "server_pid": self.launcher.runner.proc.pid}

    def launch(self, cell: dict[str, Any], opts: dict[str, Any], timeout_s: float, name: str) -> dict[str, Any]:
        """Run one cell; ``launched`` (``dataclasses.asdict(Launched)``) and its log text,
        or ``lost`` when the fork server died under it."""
        assert self.launcher is not None and self.dir is not None
        log = self.dir / name
        out = self.launcher.runner.run_job(CELL_TARGET, {"spec_dict": cell, "opts": opts}, timeout_s=timeout_s,
                                           log_path=log)
        text = _take_log(log)
        if out.extra.get("server_died") and out.result is None:
            if out.pid:  # the cell outlived its server (its own session): it must not run beside its rerun
                try:
                    os.killpg(out.pid, signal.SIGKILL)
                except OSError:
                    pass
            return {"lost": f"the fork server on {self.label} died during the cell", "log_text": text}
        return {"launched": dataclasses.asdict(launched_from(out, timeout_s)), "log_text": text}

    def run_job(self, target: str, args: dict[str, Any], timeout_s: float, name: str) -> dict[str, Any]:
        """Any other job through the fork server (the host's fingerprint, loader checks)."""
        assert self.launcher is not None and self.dir is not None
        log = self.dir / name
        out = self.launcher.run_job(target, args, timeout_s=timeout_s, log_path=log)
        return {"outcome": dataclasses.asdict(out), "log_text": _take_log(log)}

    def pids(self) -> dict[str, int | None]:
        """This actor's and its fork server's process ids (tests kill them)."""
        runner = self.launcher.runner if self.launcher else None
        return {"actor": os.getpid(), "server": runner.proc.pid if runner and runner.proc else None}

    def close(self) -> str:
        """Stop the fork server; its log's text (the node's folder is removed)."""
        text = ""
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        if self.dir is not None:
            text = _take_log(self.dir / "forkserver.log")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return text
