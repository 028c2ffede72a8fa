"""``--ray``: a sweep's cells over the GPUs of a Ray cluster (``RayExecutor``). Driver side;
imports ray lazily (only when ``--ray`` is given) and never torch.

- Connecting (``connect``): ``ray.init(address=...)`` for ``auto`` or an address; for
  ``local[:N]`` a one-node cluster started in this process with N GPUs (fake ones where
  NVML sees none: the cells then run on the CPU).
- Facts (``cluster_facts``): the capability rules and the defaults (model, matrix, time
  limit) judge cells by a GPU node's facts, gathered by a one-GPU task, not by the
  driver's: the driver may well be a head node without a GPU.
- Workers: one actor per GPU of the cluster (``ray.remote(num_gpus=1)`` around
  ``harness.run.ray_node.GpuWorker``), each with a fork server pinned to its GPU; the
  scheduling is ``harness.run.remote.RemoteExecutor``'s (the GPU pool's row order, the
  driver deciding and recording, lost workers' cells run again).
- A worker is lost when Ray says its actor, its worker process or its node died
  (``RayActorError``, which ``ActorDiedError`` and ``ActorUnavailableError`` derive from;
  ``WorkerCrashedError``; ``NodeDiedError``; ``ObjectLostError``; ``OwnerDiedError``;
  ``LocalRayletDiedError``: ``ray.exceptions`` as of Ray 2.60; a name an older Ray lacks
  is skipped), or when its fork server died under a cell. A new actor takes its place
  wherever a GPU is free.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from harness.core.errors import SpecError
from harness.core.host import import_root, nvml_gpus
from harness.plan.cluster import RayTarget
from harness.plan.gpus import GpuSlot
from harness.run.forkserver import JobOutcome, RunnerError
from harness.run.launch import Lane, Launched
from harness.run.pool import pin_fields
from harness.run.remote import Lost, RemoteExecutor, one_line

LOST_ERRORS = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
               "LocalRayletDiedError")
FACTS_TIMEOUT_S = 600.0


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return tuple(getattr(rex, n) for n in LOST_ERRORS if hasattr(rex, n))


def connect(target: RayTarget) -> None:
    """Join (or for ``local`` start) the cluster, once per process."""
    import ray

    if ray.is_initialized():
        return
    # cell logs come back with the results: the workers' own output stays on the nodes
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if target.local:
        real = len(nvml_gpus()[0])
        if real and target.local_gpus > real:
            raise SpecError(f"--ray {target.text}: this host has {real} GPU(s); local:N cannot give more "
                            "(fake GPUs are for hosts without one)")
        kw.update(address="local", num_gpus=target.local_gpus,  # "local": never a cluster already running here num_cpus=max(target.local_gpus + 1, os.cpu_count() or 1),
                  include_dashboard=False, object_store_memory=128 * 1024 ** 2,
                  runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                      p for p in (import_root(), os.environ.get("PYTHONPATH", "")) if p)}})
    else:
        _check_reachable(target)
        kw["address"] = target.address
    try:
        ray.init(**kw)
    except Exception as exc:  # noqa: BLE001 - a wrong address, a cluster of another Ray version
        hint = ""
        if not target.local and not os.environ.get("RAY_AUTH_MODE"):  # Ray >= 2.5x: an address never implies it
            hint = "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here"
        raise SpecError(f"--ray {target.text}: could not connect to {target.describe()} ({one_line(exc)}{hint})") \
            from None


def _check_reachable(target: RayTarget) -> None:
    """A head node's host:port that nothing answers on is refused at once (Ray itself
    retries for minutes, printing its own warnings)."""
    import socket

    addr = target.address or ""
    host, _, port = addr.removeprefix("ray://").rpartition(":")
    if addr == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise SpecError(f"--ray {target.text}: nothing answers at {host}:{port} ({type(exc).__name__}: {exc}); "
                        "give the head node's address (ray start --head prints it)") from None


def cluster_gpus(target: RayTarget) -> int:
    import ray

    n = int(ray.cluster_resources().get("GPU", 0))
    if n < 1:
        raise SpecError(f"--ray {target.text}: {target.describe()} has no GPU (start its nodes with GPUs, "
                        "ray start --num-gpus N, or try --ray local:2)")
    return n


def cluster_facts(target: RayTarget) -> dict[str, Any]:
    """Host facts of a GPU node of the cluster (a one-GPU task runs ``quick_facts`` there)."""
    import ray

    from harness.run.ray_node import node_facts

    connect(target)
    cluster_gpus(target)
    ref = ray.remote(num_gpus=1)(node_facts).remote()
    try:
        return ray.get(ref, timeout=FACTS_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise SpecError(f"--ray {target.text}: no GPU of {target.describe()} became free within "
                        f"{FACTS_TIMEOUT_S:g} s") from None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class RayWorker:
    """One actor on one GPU, seen from the driver (``harness.run.remote.Remote``, and a
    ``Launcher`` for the main lane's blocking calls)."""

    def __init__(self, actor_class: Any, logs_dir: Path) -> None:
        self.actor = actor_class.remote()
        self.logs_dir = logs_dir
        self.info: dict[str, Any] | None = None
        self.slot: GpuSlot | None = None
        self._boot_ref: Any = None
        self.lane = Lane(self, None, self.placement)

    @property
    def label(self) -> str:
        return self.lane.label or "a Ray worker"

    # -- Remote ---------------------------------------------------------------------
    def boot(self) -> Any:
        if self._boot_ref is None:
            self._boot_ref = self.actor.start.remote()
        return self._boot_ref

    def booted(self, handle: Any) -> dict[str, Any]:
        import ray

        if self.info is None:
            self.info = ray.get(handle)
            self.slot = GpuSlot(**self.info["slot"])
            self.lane.label = self.info["label"]
        return self.info

    def submit(self, cell: Any, opts: dict[str, Any], timeout_s: float, log_path: Path) -> Any:
        return self.actor.launch.remote(cell.to_dict(), opts, timeout_s, Path(log_path).name)

    def finish(self, handle: Any, log_path: Path) -> Launched:
        import ray

        try:
            out = ray.get(handle)
        except _lost_errors() as exc:
            raise Lost(one_line(exc)) from None
        _write(Path(log_path), out.get("log_text") or "")
        if out.get("lost"):
            raise Lost(out["lost"])
        return Launched(**dict(out["launched"], log=str(log_path)))

    def placement(self, worker: dict[str, Any]) -> dict[str, Any]:
        """Where the cell ran: the node (its hostname replaces the driver's env.json one),
        the GPU Ray gave, and the GPU fields of the pool (``pin_fields``)."""
        if self.info is None or self.slot is None:
            return {}
        fields = pin_fields(worker, slot=self.slot, pool=[self.slot.index])
        fields.pop("gpu_pool", None)
        info = self.info
        fields.update(hostname=info["node"], ray_node=info["node"], ray_node_ip=info["ip"],
                      ray_node_id=info["node_id"], ray_gpu_id=info["gpu_id"])
        return fields

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    # -- Launcher (the main lane) ----------------------------------------------------------
    def start(self) -> dict[str, Any]:
        try:
            return self.booted(self.boot())["ready"]
        except _lost_errors() as exc:
            raise RunnerError(f"the first Ray worker was lost while starting ({one_line(exc)})") from None

    def launch(self, cell: Any, opts: dict[str, Any], *, timeout_s: float, log_path: str | os.PathLike) -> Launched:
        try:
            return self.finish(self.submit(cell, opts, timeout_s, Path(log_path)), Path(log_path))
        except Lost as exc:
            raise RunnerError(f"{self.label} was lost while running {cell.cell_id} ({exc}); rerun with --resume") \
                from None

    def run_job(self, target: str, args: dict[str, Any], *, timeout_s: float,
                log_path: str | os.PathLike) -> JobOutcome:
        import ray

        try:
            out = ray.get(self.actor.run_job.remote(target, args, timeout_s, Path(log_path).name))
        except _lost_errors() as exc:
            raise RunnerError(f"{self.label} was lost while running {target} ({one_line(exc)})") from None
        _write(Path(log_path), out.get("log_text") or "")
        return JobOutcome(**dict(out["outcome"], log_path=str(log_path)))

    def close(self) -> None:
        """Stop the fork server (its log into logs/ray/<node>-gpu<i>/), then the actor."""
        import ray

        try:
            if self.info is not None:
                text = ray.get(self.actor.close.remote(), timeout=60)
                _write(self.logs_dir / "ray" / self.label.replace(":", "-") / "forkserver.log", text)
        except Exception:  # noqa: BLE001 - a worker already gone keeps its log
            pass
        finally:
            self.kill()


class RayCluster:
    """``harness.run.remote.Cluster`` over Ray: one actor per GPU."""

    boot_timeout_s = 600.0
    grace_s = 120.0

    def __init__(self, target: RayTarget) -> None:
        self.target = target
        self.logs_dir = Path(".")
        self._actor_class: Any = None
        self.gpus = 0

    def workers(self, logs_dir: Path) -> list[RayWorker]:
        import ray

        from harness.run.ray_node import GpuWorker

        connect(self.target)
        self.gpus = cluster_gpus(self.target)
        self.logs_dir = logs_dir
        # one GPU each; a lost actor is replaced by the executor, not restarted by Ray
        self._actor_class = ray.remote(GpuWorker).options(num_gpus=1, num_cpus=1, max_restarts=0,
                                                          max_task_retries=0)
        return [RayWorker(self._actor_class, logs_dir) for _ in range(self.gpus)]

    def replace(self, lost: Any) -> RayWorker | None:
        return RayWorker(self._actor_class, self.logs_dir) if self._actor_class is not None else None

    def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        import ray

        if not handles:
            return []
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        return ready

    def describe(self) -> dict[str, Any]:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
        return {"ray": self.target.text, "nodes": len(nodes), "gpus": self.gpus}

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


class RayExecutor(RemoteExecutor):
    """The executor ``--ray`` asks for (``harness.run.executor_for``)."""

    def __init__(self, target: RayTarget) -> None:
        super().__init__(RayCluster(target))
        self.target = target
