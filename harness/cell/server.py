"""Worker side of the runner: a fork server, and the code a cell's process runs.

Importing torch, transformers, peft and bitsandbytes costs 21-29 s on the H200 test host
(../shared/GPU.md). The fork server pays that once: it imports the libraries, never
initialises CUDA, and forks one fresh child per job, so every cell still runs in its own
process (its own CUDA context, its own memory high-water marks, nothing left over from
the cell before) but starts in milliseconds.

Protocol (JSON lines): the runner writes ``{"cmd": "run", "job": {...}}`` or
``{"cmd": "shutdown"}`` to the server's stdin; the server answers ``ready``, then
``started`` (job_id, pid) and ``exited`` (job_id, pid, returncode, signal) events on its
stdout. A job names a ``target`` ("module:function"), its ``args``, a ``result_path``
(written atomically by the child) and a ``log_path`` (the child's stdout and stderr).

If a forked child cannot use CUDA (a library initialised it at import), the server says
so in ``ready`` and falls back to fork+exec: slower, still one process per job.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import sys
import time
import traceback
from typing import Any

from harness.core.phases import TIMELINE  # a pure module: no library import before the preload

# torch.cuda.is_available() must not initialise CUDA in the server: with this set it asks
# NVML instead, which is safe to fork after.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
# CUDA numbers devices in NVML's order (PCI bus), so CUDA_VISIBLE_DEVICES=N pins NVML index N.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Per-cell logs are read by people: no progress bars redrawn hundreds of times.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Never liger_kernel or unsloth: they patch transformers' classes for the whole process,
# so preloaded here they would patch every cell forked from it (harness.cell.stacks.base).
PRELOAD = (
    "torch",
    "numpy",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",  # the VLM presets
    "harness.cell.train",
    "harness.core.host",
)


def _emit(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def _resolve(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def write_atomic(path: str, data: dict[str, Any]) -> None:
    """A result file written whole or not at all (temp file, fsync, rename)."""
    from harness.core.record import dumps

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_job_here(job: dict[str, Any]) -> int:
    """Run one job in this (fresh) process: the body of every cell's process."""
    t_start = time.monotonic()  # the process's start on the parent's clock (harness.core.phases.TIMELINE)
    import faulthandler

    for k, v in (job.get("env") or {}).items():
        os.environ[k] = str(v)
    log = open(job["log_path"], "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    faulthandler.enable(file=sys.stderr)  # a segfault leaves its Python stack in the log
    # ... and so does a hang: the launcher sends SIGUSR1 before it kills a job at its limit
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    _limit_address_space()
    print(f"[worker {os.getpid()}] job {job.get('job_id')}: {job['target']}", flush=True)
    try:
        target = _resolve(job["target"])
        # Move every object alive now (the libraries' ~450k objects, imported by the
        # server or just now in spawn mode) out of the collector's reach. Otherwise the first
        # full collection in a cell walks them all inside a timed step: +0.2-0.5 s once per
        # cell, the outlier step of the H200 reference run's gc-on cells. Objects the job
        # creates are collected as before. (Python's docs advise this for fork servers.)
        gc.freeze()
        result = target(**(job.get("args") or {}))
        if not isinstance(result, dict):
            result = {"status": "error", "error": f"job returned {type(result).__name__}, not a dict"}
        elif TIMELINE in result:  # a cell: the launcher turns this into phase_spawn_s
            result[TIMELINE]["child_start"] = t_start
            result["gc_frozen_objects"] = gc.get_freeze_count()
    except BaseException as exc:  # noqa: BLE001 - the runner classifies; never lose the reason
        from harness.core.record import is_oom_message

        text = f"{type(exc).__name__}: {exc}"
        oom = type(exc).__name__ == "OutOfMemoryError" or is_oom_message(text)
        result = {"status": "oom" if oom else "error", "error": text[:2000], "traceback": traceback.format_exc()[-4000:]}
        traceback.print_exc()
    write_atomic(job["result_path"], result)
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def _limit_address_space() -> None:
    """With LORA_HARNESS_RLIMIT_AS_EXTRA=N (bytes), cap this process's address space at
    its current size + N: a real host-memory limit for CPU cells (used by the tests to
    produce genuine out-of-memory failures; a forked child starts with the server's
    mappings, so the cap is relative)."""
    extra = os.environ.get("LORA_HARNESS_RLIMIT_AS_EXTRA")
    if not extra:
        return
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(extra), resource.RLIM_INFINITY))
    print(f"address space capped at {(vm + int(extra)) / 2**30:.1f} GiB", flush=True)


def _child_main(job: dict[str, Any]) -> None:
    """In the forked child: own process group (so a timeout kills everything it started)."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = run_job_here(job)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        os._exit(code)


def _launch(job: dict[str, Any], fork_mode: bool) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        if fork_mode:
            _child_main(job)
        # spawn mode: a brand-new interpreter (imports paid again) for hosts where a forked
        # child cannot use the accelerator
        try:
            os.setsid()
            jf = job["result_path"] + ".job.json"
            with open(jf, "w") as f:
                json.dump(job, f)
            os.execv(sys.executable, [sys.executable, "-m", "harness.cell.server", "--job", jf])
        finally:
            os._exit(127)
    return pid


class _NvmlCapability:
    """Stand-in for ``torch.cuda.get_device_capability`` while libraries are imported.

    bitsandbytes asks for the compute capability at import time to choose its native
    library; torch answers by initialising CUDA, after which a forked child cannot use
    the GPU. NVML gives the same answer without touching CUDA. Used only during the
    preload; the fork self-test still checks that children get a working GPU.
    """

    def __enter__(self):
        import torch

        self._orig = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = self._capability
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.get_device_capability = self._orig
        return False

    def _capability(self, device=None):
        import pynvml

        from harness.cell.trackers.memory import nvml_index_for_visible_device

        idx = getattr(device, "idx", None)
        if idx is None:
            idx = getattr(device, "index", None)
        if idx is None:
            idx = device if isinstance(device, int) else 0
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(nvml_index_for_visible_device(int(idx)))
            return tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
        finally:
            pynvml.nvmlShutdown()


def _preload(skip: set[str]) -> tuple[float, list[str], str | None]:
    """Import the heavy libraries; returns (seconds, errors, first module that initialised CUDA)."""
    import contextlib

    import torch

    t0 = time.perf_counter()
    errors = []
    culprit = None
    # peft imports bitsandbytes, which asks torch for the compute capability: patch for
    # the whole preload, not just one import.
    with _NvmlCapability() if _has_nvidia_gpu() else contextlib.nullcontext():
        for name in PRELOAD:
            if name in skip:
                continue
            try:
                importlib.import_module(name)
            except Exception as exc:  # a missing optional library is reported, not fatal
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
            if culprit is None and torch.cuda.is_initialized():
                culprit = name
    return time.perf_counter() - t0, errors, culprit


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:
        return False


def _fork_self_test(timeout_s: float = 120.0) -> tuple[bool, str]:
    """Does a forked child get a working accelerator (or a working CPU thread pool)?"""
    import torch

    if torch.cuda.is_initialized():
        return False, "CUDA was initialised while importing the libraries"
    gpu = _has_nvidia_gpu()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            x = torch.randn(256, 256, device="cuda" if gpu else "cpu")
            code = 0 if float((x @ x).sum()) == float((x @ x).sum()) else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return True, "forked child ran on " + ("cuda" if gpu else "cpu")
            return False, f"forked child failed (status {status})"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False, "forked child hung"


def serve() -> None:
    # Keep the protocol channel clean: library chatter during imports goes to stderr.
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    skip = {s for s in os.environ.get("LORA_HARNESS_PRELOAD_SKIP", "").split(",") if s}
    preload_s, errors, culprit = _preload(skip)
    mode = os.environ.get("LORA_HARNESS_WORKER_MODE", "fork")
    why = "asked for spawn" if mode == "spawn" else ""
    if mode == "fork":
        ok, why = _fork_self_test()
        if culprit:
            why += f" (importing {culprit} initialised CUDA)"
        if not ok and culprit and culprit not in skip and culprit != "torch":
            # Start again without preloading that module (children import it themselves).
            print(f"fork self-test failed ({why}); restarting without preloading {culprit}", file=sys.stderr)
            os.dup2(proto_fd, 1)
            os.environ["LORA_HARNESS_PRELOAD_SKIP"] = ",".join(sorted(skip | {culprit}))
            os.execv(sys.executable, [sys.executable, "-m", "harness.cell.server", "--server"])
        mode = "fork" if ok else "spawn"
        if ok and skip:
            why += f" (not preloaded: {', '.join(sorted(skip))})"
    import threading

    try:
        native_threads = len(os.listdir("/proc/self/task"))
    except OSError:
        native_threads = None
    print(f"worker server {os.getpid()}: mode {mode} ({why}); preload {preload_s:.1f} s; threads: "
          f"{native_threads} native, python: {[t.name for t in threading.enumerate()]}", file=sys.stderr, flush=True)
    os.dup2(proto_fd, 1)
    os.close(proto_fd)
    _emit({"event": "ready", "pid": os.getpid(), "mode": mode, "why": why, "preload_s": preload_s,
           "preload_errors": errors})
    children: dict[int, str] = {}
    buf = b""
    stdin_fd = sys.stdin.fileno()
    open_input = True
    while open_input or children:
        if open_input:
            r, _, _ = select.select([stdin_fd], [], [], 0.02)
            if r:
                chunk = os.read(stdin_fd, 65536)
                if not chunk:  # the runner went away: nobody will read the results
                    open_input = False
                    for pid in children:
                        _killpg(pid)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    req = json.loads(line)
                    if req.get("cmd") == "shutdown":
                        open_input = False
                        for pid in children:
                            _killpg(pid)
                    elif req.get("cmd") == "run":
                        job = req["job"]
                        pid = _launch(job, fork_mode=(mode == "fork"))
                        children[pid] = job["job_id"]
                        _emit({"event": "started", "job_id": job["job_id"], "pid": pid})
        else:
            time.sleep(0.02)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            job_id = children.pop(pid, None)
            if job_id is None:
                continue
            rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            _emit({"event": "exited", "job_id": job_id, "pid": pid, "returncode": rc, "signal": sig})


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--server"]:
        serve()
        return 0
    if argv[:1] == ["--job"] and len(argv) == 2:
        with open(argv[1]) as f:
            job = json.load(f)
        return run_job_here(job)
    print("usage: python -m harness.cell.server --server | --job JOB.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
