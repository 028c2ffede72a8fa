"""Parent side of torchrun cells: launch, time limit, merge, scaling efficiency. Imports
no torch.

A cell with ``world_size`` N > 1 does not go through the fork server. The parent runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m harness.cell.rank JOB.json

in its own session (process group), with the cell's time limit, ``NCCL_NVLS_ENABLE=0``
(NVLink multicast off: on shared hosts it can take the GPUs out of service),
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA numbers GPUs as NVML does), its output appended to
the cell's log file. ``--standalone`` makes torchrun's rendezvous bind port 0: the OS
picks a free port, so concurrent cells never collide. Each rank (``harness.cell.rank``)
writes its own record; ``merge_ranks`` turns them into the cell's one record.
``TorchrunLauncher`` is this as a launcher (``harness.run.launch``).

On the time limit: SIGTERM to torchrun (it stops its ranks), then after a grace period
SIGKILL to torchrun's group and to each rank's group (torchrun starts every rank in a
session of its own; the ranks write their pids, and only a process whose command line
still names ``harness.cell.rank`` is killed).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import flops as flops_mod
from harness.core.host import import_root
from harness.core.phases import TIMELINE
from harness.core.record import Status
from harness.core.spec import CellSpec
from harness.run.forkserver import JobOutcome
from harness.run.launch import Launched
from harness.core.jobs import rank_file

# Lists, one entry per rank (None where a rank wrote no record), copied from each rank's record.
PER_RANK_FIELDS: tuple[str, ...] = (
    "status", "peak_vram_bytes", "peak_vram_over_baseline_bytes", "baseline_vram_bytes",
    "torch_peak_allocated_bytes", "torch_peak_reserved_bytes", "peak_rss_bytes", "step_time_s", "tokens_per_s",
    "energy_j",
)
# The usual fields that hold the largest value over ranks (what the tightest GPU needed).
MAX_FIELDS: tuple[str, ...] = ("peak_vram_bytes", "peak_vram_over_baseline_bytes", "torch_peak_allocated_bytes",
                               "torch_peak_reserved_bytes", "peak_rss_bytes", "peak_rss_sampled_bytes",
                               "non_allocator_peak_bytes", "cuda_context_bytes")
GRACE_S = 10.0
_ids = itertools.count(1)


@dataclass
class DistOutcome:
    rank_results: dict[int, dict[str, Any]]
    returncode: int | None
    signal: int | None
    timed_out: bool
    wall_s: float
    log_path: str
    command: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def torchrun_command(world_size: int, job_path: str, *, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(world_size), "-m", "harness.cell.rank", str(job_path)]


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    root = import_root()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["NCCL_NVLS_ENABLE"] = "0"  # always: NVLink multicast can take a shared host's GPUs out of service
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA ordinal = NVML index (per-rank NVML sampling)
    return env


def launch(cell: CellSpec, opts: dict[str, Any], *, timeout_s: float, log_path: str | os.PathLike,
           work_dir: str | os.PathLike, python: str | None = None) -> DistOutcome:
    """Run the cell's ranks under torchrun; never raises for what the ranks do."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = str(work / f"dist{next(_ids)}-{os.getpid()}")
    n = cell.world_size
    for r in range(n):
        for kind in ("json", "pid"):
            if os.path.exists(rank_file(prefix, r, kind)):
                os.remove(rank_file(prefix, r, kind))
    job_path = prefix + ".job.json"
    with open(job_path, "w") as f:
        json.dump({"spec": cell.to_dict(), "opts": opts, "prefix": prefix, "collective_timeout_s": timeout_s}, f)
    cmd = torchrun_command(n, job_path, python=python)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"[launcher] {' '.join(cmd)}\n[launcher] NCCL_NVLS_ENABLE=0 CUDA_DEVICE_ORDER=PCI_BUS_ID, "
                  f"time limit {timeout_s:g} s\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=launch_env(), cwd=os.getcwd(), start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc, prefix, n)
    except BaseException:  # interrupted (Ctrl-C): leave nothing running
        _stop(proc, prefix, n)
        raise
    wall = time.monotonic() - t0
    rc = proc.returncode
    results: dict[int, dict[str, Any]] = {}
    for r in range(n):
        path = rank_file(prefix, r)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    results[r] = json.load(f)
            except ValueError:
                pass
        for kind in ("json", "pid"):
            if os.path.exists(rank_file(prefix, r, kind)):
                os.remove(rank_file(prefix, r, kind))
    os.remove(job_path)
    sig = -rc if rc is not None and rc < 0 else None
    return DistOutcome(results, None if sig else rc, sig, timed_out, wall, str(log_path), cmd)


class TorchrunLauncher:
    """Cells with ``world_size`` > 1, one torchrun each (see the module docstring);
    nothing runs between cells, so ``start`` and ``close`` have nothing to do."""

    def __init__(self, work_dir: str | os.PathLike, *, python: str | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.python = python

    def start(self) -> dict[str, Any]:
        return {"mode": "torchrun"}

    def launch(self, cell: CellSpec, opts: dict[str, Any], *, timeout_s: float,
               log_path: str | os.PathLike) -> Launched:
        out = launch(cell, opts, timeout_s=timeout_s, log_path=log_path, work_dir=self.work_dir, python=self.python)
        worker = merge_ranks(cell, out, timeout_s)
        # The ranks' clock readings are dropped: torchrun, not this launcher, started and
        # ended their processes, so there is no spawn or teardown of the cell to time.
        worker.pop(TIMELINE, None)
        return Launched(worker, out.wall_s, str(log_path), out.returncode, out.signal)

    def run_job(self, target: str, args: dict[str, Any], *, timeout_s: float,
                log_path: str | os.PathLike) -> JobOutcome:
        raise NotImplementedError("torchrun launches cells only; run other jobs through a ForkLauncher")

    def close(self) -> None:
        pass


def _stop(proc: subprocess.Popen, prefix: str, world_size: int) -> None:
    """SIGTERM torchrun (it stops its ranks), then SIGKILL its group and each rank's."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        pass
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid] + [_rank_pid(rank_file(prefix, r, "pid")) for r in range(world_size)]:
        if pid is None:
            continue
        if pid != proc.pid and not _is_rank_process(pid):
            continue
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL always ends it
        pass


def _rank_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _is_rank_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"harness.cell.rank" in f.read()
    except OSError:
        return False


def _log_tail(path: str, n: int = 8) -> str:
    from harness.run.forkserver import _log_tail as tail

    return tail(path, n)


# -- merging the ranks' records --------------------------------------------------------

# A rank whose peer died fails inside its next collective with one of these: the failure
# is the peer's, not its own (gloo, NCCL, c10d wording).
COLLATERAL_MARKERS: tuple[str, ...] = (
    "connection closed by peer", "connection reset by peer", "remote process exited", "broken pipe",
    "distbackenderror", "distnetworkerror", "communicator was aborted", "collective operation timeout",
)


def is_collateral(rec: dict[str, Any]) -> bool:
    """Whether a rank's error came from a peer that went away during a collective."""
    return rec.get("status") == Status.ERROR.value and any(m in str(rec.get("error") or "").lower()
                                                          for m in COLLATERAL_MARKERS)


def _first_failure(results: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    """The rank whose failure names the cell: an OOM anywhere first (the cell ran out of
    memory), then an error of its own, then unsupported; errors a dead peer caused
    (``is_collateral``) come last."""
    for status in (Status.OOM.value, Status.ERROR.value, Status.UNSUPPORTED.value):
        for r in sorted(results):
            if results[r].get("status") == status and not is_collateral(results[r]):
                return r, results[r]
    for r in sorted(results):
        if results[r].get("status") != Status.OK.value:
            return r, results[r]
    return None


def merge_ranks(cell: CellSpec, out: DistOutcome, timeout_s: float) -> dict[str, Any]:
    """The worker half of the cell's record from its ranks' records (see
    docs/results-schema.md, "Multi-GPU cells")."""
    n = cell.world_size
    res = out.rank_results
    ranks = list(range(n))
    base_rank = min(res) if res else None
    merged: dict[str, Any] = dict(res[base_rank]) if base_rank is not None else {}
    for k in ("rank_facts", "worker_pid"):
        merged.pop(k, None)
    merged.update({"world_size": n, "parallel": cell.parallel, "launcher": "torchrun",
                   "torchrun_exit_code": out.returncode, "torchrun_signal": out.signal,
                   "ranks_reported": len(res)})
    for f in PER_RANK_FIELDS:
        merged[f"per_rank_{f}"] = [res[r].get(f) if r in res else None for r in ranks]
    facts = [res[r].get("rank_facts") or {} if r in res else {} for r in ranks]
    merged["per_rank_error"] = [(res[r].get("error") or None) if r in res else None for r in ranks]
    merged["per_rank_losses"] = [res[r].get("losses") if r in res else None for r in ranks]
    merged["per_rank_nvml_index"] = [f.get("nvml_index") for f in facts]
    merged["per_rank_nvml_uuid_match"] = [f.get("nvml_uuid_match") for f in facts]
    merged["per_rank_device_uuid"] = [f.get("cuda_uuid") for f in facts]
    merged["per_rank_lora_checksum"] = [f.get("lora_checksum") for f in facts]
    merged["per_rank_pid"] = [f.get("pid") for f in facts]
    merged["dist_backend"] = next((f.get("backend") for f in facts if f.get("backend")), None)
    fsdp = next((f.get("fsdp") for f in facts if f.get("fsdp")), None)
    if fsdp:
        merged["fsdp"] = fsdp
    ddp = next((f.get("ddp_options") for f in facts if f.get("ddp_options")), None)
    if ddp:
        merged["ddp_options"] = ddp
    for f in MAX_FIELDS:
        vals = [res[r].get(f) for r in res if isinstance(res[r].get(f), (int, float))]
        merged[f] = max(vals) if vals else None
    sums = [c for c in merged["per_rank_lora_checksum"] if c]
    merged["lora_in_sync"] = (len(set(sums)) == 1) if len(sums) == n else None

    all_ok = len(res) == n and all(r.get("status") == Status.OK.value for r in res.values())
    if out.timed_out:
        merged["status"] = Status.TIMEOUT.value
        merged["error"] = (f"killed after the cell's {timeout_s:g} s limit ({len(res)} of {n} ranks had reported); "
                           f"log ends: {_log_tail(out.log_path, 3)}")
    elif all_ok:
        merged["status"] = Status.OK.value
        merged["error"] = None
        _merge_timing(cell, res, merged)
        if merged["lora_in_sync"] is False:
            merged["status"] = Status.ERROR.value
            merged["error"] = (f"the LoRA weights differ between ranks after training (checksums "
                               f"{merged['per_rank_lora_checksum']}): gradients were not synchronised")
    else:
        fail = _first_failure(res)
        missing = [r for r in ranks if r not in res]
        if fail is not None and is_collateral(fail[1]) and missing:  # the missing rank died first
            r, rec = fail
            how = f"signal {out.signal}" if out.signal else f"exit code {out.returncode}"
            merged["status"] = Status.CRASH.value
            merged["error"] = (f"rank(s) {', '.join(map(str, missing))} ended without a result (torchrun {how}); "
                               f"rank {r} then failed in a collective: {str(rec.get('error'))[:300]}; "
                               f"log ends: {_log_tail(out.log_path)}")
            merged["failed_rank"] = missing[0]
        elif fail is not None:
            r, rec = fail
            merged["status"] = rec.get("status")
            merged["error"] = f"rank {r}: {rec.get('error') or 'no detail'}"
            for k in ("traceback", "phase", "oom_phase"):
                if k in rec:
                    merged[k] = rec[k]
            merged["failed_rank"] = r
        else:  # every rank that reported was ok, but some never did: they died
            how = f"signal {out.signal}" if out.signal else f"exit code {out.returncode}"
            merged["status"] = Status.CRASH.value
            merged["error"] = (f"rank(s) {', '.join(map(str, missing))} ended without a result (torchrun {how}); "
                               f"log ends: {_log_tail(out.log_path)}")
            merged["failed_rank"] = missing[0] if missing else None
    if merged["status"] != Status.OK.value:  # a rank's own figures are not the cell's
        merged["tokens_per_s"] = merged["per_gpu_tokens_per_s"] = merged["mfu"] = None
    return merged


def _merge_timing(cell: CellSpec, res: dict[int, dict[str, Any]], merged: dict[str, Any]) -> None:
    """Step i of the cell takes as long as its slowest rank; the cell's tokens/s is every
    rank's tokens over that time."""
    from harness.core.steps import summarize

    n = cell.world_size
    per = [res[r].get("step_times_s") or [] for r in range(n)]
    steps = min(len(p) for p in per)
    slowest = [max(p[i] for p in per) for i in range(steps)]
    warm = [res[r].get("warmup_step_times_s") or [] for r in range(n)]
    wsteps = min(len(w) for w in warm)
    merged["step_times_s"] = slowest
    merged["warmup_step_times_s"] = [max(w[i] for w in warm) for i in range(wsteps)]
    merged.update(summarize(slowest, cell.tokens_per_step * n))  # tokens_per_s: the total
    tps = merged.get("tokens_per_s")
    merged["per_gpu_tokens_per_s"] = tps / n if tps else None
    losses = [res[r].get("losses") or [] for r in range(n)]
    k = min(len(x) for x in losses)
    merged["losses"] = [statistics.fmean(float(x[i]) for x in losses) for i in range(k)]
    energies = [res[r].get("energy_j") for r in range(n)]
    merged["energy_j"] = sum(energies) if all(e is not None for e in energies) else None
    tokens = cell.tokens_per_step * n * len(slowest)
    merged["energy_per_token_j"] = merged["energy_j"] / tokens if merged["energy_j"] is not None and tokens else None
    merged["mfu"] = flops_mod.mfu(merged["per_gpu_tokens_per_s"], merged.get("flops_per_token"), merged.get("peak_flops"))
    merged["nonfinite_losses"] = sum(int(res[r].get("nonfinite_losses") or 0) for r in range(n))


# -- scaling efficiency ----------------------------------------------------------------

def single_gpu_cell(cell: CellSpec) -> CellSpec:
    return cell.replace(world_size=1, parallel=None)


def scaling_fields(cell: CellSpec, worker: dict[str, Any], records) -> dict[str, Any]:
    """``scaling_efficiency`` = total tokens/s / (world_size x tokens/s of the same cell on
    one GPU), from the latest record of that cell among ``records`` (this run's); null with
    ``scaling_efficiency_reason`` when it cannot be computed."""
    base_id = single_gpu_cell(cell).cell_id
    base = None
    for rec in records:
        if rec.get("cell_id") == base_id:
            base = rec
    out: dict[str, Any] = {"scaling_efficiency": None, "scaling_baseline_cell": base_id,
                           "single_gpu_tokens_per_s": None, "scaling_efficiency_reason": None}
    if worker.get("status") != Status.OK.value:
        out["scaling_efficiency_reason"] = f"this cell ended {worker.get('status')}"
    elif base is None:
        out["scaling_efficiency_reason"] = f"no {base_id} record in this run (run --world-size 1,{cell.world_size})"
    elif base.get("status") != Status.OK.value or not base.get("tokens_per_s"):
        out["scaling_efficiency_reason"] = f"{base_id} ended {base.get('status')}"
    else:
        out["single_gpu_tokens_per_s"] = base["tokens_per_s"]
        out["scaling_efficiency"] = worker["tokens_per_s"] / (cell.world_size * base["tokens_per_s"])
    return out
