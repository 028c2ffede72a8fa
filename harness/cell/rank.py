"""One rank of a torchrun cell (worker side, imports torch).

    python -m torch.distributed.run --standalone --nproc-per-node N -m harness.cell.rank JOB.json

``harness.run.torchrun`` (the parent, no torch) writes JOB.json (the cell's spec, the worker
options, a file prefix) and launches this module once per rank. Each rank runs the same
workload as a one-process cell (``harness.cell.train.run_cell``) through ``DistHooks``:

- device ``cuda:LOCAL_RANK`` (NCCL for CUDA tensors, gloo for CPU ones), or the CPU with
  gloo on a host without a GPU;
- NVML samples the rank's own GPU: CUDA_DEVICE_ORDER=PCI_BUS_ID (set by the launcher) makes
  CUDA's numbering NVML's, and the rank checks the claim against the device's UUID
  (``nvml_uuid_match``);
- the step batches are drawn from a seed per rank (rank 0's are the one-GPU cell's);
- ``ddp``: the LoRA model is wrapped in ``DistributedDataParallel``; every rank builds or
  loads the whole model as a one-GPU cell does (same seed, same weights);
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): the model is built from its
  config with parameters on the meta device (buffers real), LoRA is attached, every
  decoder layer and then the root are sharded, and only then does each rank allocate its
  shard on its device (``to_empty``) and fill it (normal(0, initializer_range) for
  weights, ones for norms, peft's init for LoRA). No rank ever holds the full model: a
  rank's weights take 1/N of the model plus the layer being all-gathered.

Each rank writes ``<prefix>.rank<N>.json`` (its worker record, as a one-process cell
writes, plus its rank facts). A rank whose cell did not end ``ok`` exits at once with
code 3: torchrun then stops the other ranks, which may be waiting in a collective, so
nothing hangs; ``harness.run.torchrun`` merges whatever rank files exist into the cell's record.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any

# As in harness.cell.server: availability checks through NVML (no CUDA init before the NVML
# baseline is read), CUDA numbering in PCI order (NVML's).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EXIT_CELL_FAILED = 3


def _log(rank: int, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] [rank {rank}] {msg}", flush=True)


def _cpu_barrier() -> None:
    """A barrier over gloo on a CPU tensor: it never touches CUDA (usable before the NVML
    baseline) and works with either backend setup."""
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1))


def _nvml_uuid(index: int) -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            return u.decode() if isinstance(u, bytes) else str(u)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


from harness.core.jobs import rank_file  # noqa: E402 - after the environment defaults
from harness.cell.server import write_atomic  # noqa: E402 - the fork server's result writer, stdlib only
from harness.cell.hooks import CellHooks  # noqa: E402
from harness.cell.setup import Unsupported  # noqa: E402


class DistHooks(CellHooks):
    """A rank's side of the workload (see the module docstring)."""

    def __init__(self, spec, *, rank: int, local_rank: int, world_size: int, opts: dict[str, Any]) -> None:
        self.spec = spec
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.parallel = spec.parallel
        self.opts = opts
        self.nvml_ordinal = local_rank
        self.diagnose_nonfinite = spec.parallel != "fsdp"  # a lone rank's rerun would wait on the others
        self.profile_busy = False  # an extra step on some ranks only would leave the others waiting
        self.facts: dict[str, Any] = {"rank": rank, "local_rank": local_rank, "hostname": socket.gethostname(),
                                      "pid": os.getpid()}
        self.device_ = None
        # Test-only failure injection (tests/test_dist.py):
        # {"rank": 1, "step": 1, "how": "raise" | "oom" | "kill" | "hang"}
        self.fail = opts.get("_test_fail_rank")

    # -- device and NVML ---------------------------------------------------------------
    def device(self, preference: str):
        import torch

        if preference == "cpu" or not torch.cuda.is_available():
            if preference == "cuda":
                raise Unsupported("a CUDA device was asked for but none is available")
            self.device_ = torch.device("cpu")
            self.facts["nvml_index"] = None
            return self.device_
        n = torch.cuda.device_count()
        if n < self.world_size:
            raise Unsupported(f"world_size {self.world_size} needs {self.world_size} GPUs; this process sees {n}")
        torch.cuda.set_device(self.local_rank)
        self.device_ = torch.device("cuda", self.local_rank)
        from harness.cell.trackers.memory import nvml_index_for_visible_device

        idx = nvml_index_for_visible_device(self.local_rank)
        self.facts["nvml_index"] = idx
        try:
            props = torch.cuda.get_device_properties(self.device_)
            cuda_uuid = str(getattr(props, "uuid", "") or "")
            self.facts["cuda_uuid"] = cuda_uuid or None
            self.facts["pci_bus_id"] = getattr(props, "pci_bus_id", None)
            nv = _nvml_uuid(idx)
            self.facts["nvml_uuid"] = nv
            # torch prints the UUID without NVML's "GPU-" prefix
            self.facts["nvml_uuid_match"] = bool(cuda_uuid and nv and nv.removeprefix("GPU-") == cuda_uuid.removeprefix("GPU-"))
        except Exception as exc:  # the check is evidence, never fatal
            self.facts["nvml_uuid_match"] = None
            self.facts["nvml_uuid_error"] = f"{type(exc).__name__}: {exc}"
        return self.device_

    # -- model -------------------------------------------------------------------------
    def load(self, spec, load_kwargs, device, opts):
        if self.parallel != "fsdp":
            return super().load(spec, load_kwargs, device, opts)
        return _build_on_meta(spec, load_kwargs)

    def wrap(self, model, evidence):
        import torch

        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Non-reentrant checkpointing (mode "on") needs nothing special. The offload
            # mode runs each layer's backward inside its own autograd Function (reentrant),
            # which DDP only accepts with a static graph.
            kw: dict[str, Any] = {"gradient_as_bucket_view": True}
            if self.spec.grad_ckpt == "offload":
                kw["static_graph"] = True
            if self.device_.type == "cuda":
                kw.update(device_ids=[self.local_rank], output_device=self.local_rank)
            self.facts["ddp_options"] = {k: v for k, v in kw.items() if k not in ("device_ids", "output_device")}
            return DDP(model, **kw)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device_.type, (self.world_size,))
        for layer in evidence.layers:  # one FSDP unit per decoder layer, then the rest
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        t0 = time.perf_counter()
        _materialise_shards(model, self.device_, seed=self.spec.seed, rank=self.rank)
        self.facts["fsdp"] = {"api": "fully_shard", "units": len(evidence.layers) + 1,
                              "materialise_s": time.perf_counter() - t0}
        if self.device_.type == "cuda":
            torch.cuda.synchronize(self.device_)
        return model

    def grad_scaler(self, device_type: str, enabled: bool):
        if self.parallel != "fsdp":
            return super().grad_scaler(device_type, enabled)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # found_inf is all-reduced: every shard skips the same steps
        return ShardedGradScaler(device_type, enabled=enabled)

    # -- steps -------------------------------------------------------------------------
    def batch_spec(self, spec):
        # rank 0 trains on the one-GPU cell's batches; the others on their own
        return spec if self.rank == 0 else spec.replace(seed=spec.seed + 1_000_003 * self.rank)

    def before_step(self, step: int, sync) -> None:
        if self.fail and int(self.fail.get("rank", -1)) == self.rank and int(self.fail.get("step", 0)) == step:
            _inject_failure(self.fail.get("how", "raise"), self.rank)
        sync()
        _cpu_barrier()  # ranks start each step together: per-rank step times compare

    def after_train(self, model, out: dict[str, Any]) -> None:
        self.facts["lora_checksum"] = lora_checksum(model)


def _inject_failure(how: str, rank: int) -> None:
    """Tests only (never set by an option): make this rank fail the way a real one does."""
    print(f"injected failure on rank {rank}: {how}", flush=True)
    if how == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        time.sleep(3600)
    if how == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected out of memory on rank {rank} (test)")
    raise RuntimeError(f"injected failure on rank {rank} (test)")


def lora_checksum(model) -> str:
    """sha256 over the trainable (LoRA) weights in parameter order, full tensors (FSDP
    shards are gathered: every rank must call this): equal on every rank iff the ranks
    hold the same adapter."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _build_on_meta(spec, load_kwargs):
    """FSDP: the model from its config, parameters on the meta device, buffers (rotary
    tables) computed for real on the CPU; nothing is allocated for the weights."""
    from accelerate import init_empty_weights

    from harness.core.models import get_preset
    from harness.cell.build import _model_class, make_config

    t0 = time.perf_counter()
    if spec.model_path or "quantization_config" in load_kwargs:  # the capability rules say so first
        raise Unsupported("FSDP cells build 16/32-bit presets from their config")
    preset = get_preset(spec.model)
    config = make_config(preset)
    with init_empty_weights(include_buffers=False):
        model = _model_class(config).from_config(config, dtype=load_kwargs["dtype"],
                                                 attn_implementation=spec.attn_implementation)
    if preset.get("init_overrides"):
        raise Unsupported(f"{spec.model}: init_overrides are not applied to FSDP shards")
    info = {"load_path": "config-meta", "load_time_s": time.perf_counter() - t0,
            "loaded_in_training_mode": bool(model.training)}
    return model, info


def _materialise_shards(model, device, *, seed: int, rank: int) -> None:
    """Allocate each rank's shards on ``device`` and fill them. Buffers (computed on the CPU
    at build time) are copied back after ``to_empty``, which leaves everything
    uninitialised."""
    import math

    import torch

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02) or 0.02)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 7919 * rank + 1)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n].to(b.dtype))
        for n, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel() == 0:
                continue
            parts = n.split(".")
            if "lora_B" in parts:
                local.zero_()  # peft's default: the adapter starts as the identity
            elif "lora_A" in parts:
                bound = 1.0 / math.sqrt(p.shape[-1])  # kaiming_uniform(a=sqrt(5)), peft's default
                local.uniform_(-bound, bound, generator=gen)
            elif p.dim() == 1:
                local.fill_(1.0 if "norm" in n else 0.0)
            else:
                local.normal_(0.0, std, generator=gen)


def _init_process_group(use_cuda: bool, timeout_s: float) -> str:
    import torch.distributed as dist

    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return backend


def run_rank(job: dict[str, Any], rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    import torch

    from harness.core.spec import CellSpec
    from harness.cell.train import run_cell

    spec = CellSpec.from_dict(job["spec"])
    opts = dict(job.get("opts") or {})
    use_cuda = opts.get("device", "auto") != "cpu" and torch.cuda.is_available()
    backend = _init_process_group(use_cuda, float(job.get("collective_timeout_s") or 600))
    _log(rank, f"process group up ({backend}, world size {world_size}); cell {spec.cell_id}")
    if use_cuda and rank == 0:
        # The synthetic checkpoint of a pretrained cell is written once, by rank 0, before
        # any rank measures (a failure shows again, classified, inside run_cell).
        try:
            from harness.cell.budget_guard import prepare_checkpoint

            prepare_checkpoint(spec, opts)
        except Exception as exc:  # noqa: BLE001
            _log(rank, f"checkpoint preparation failed: {type(exc).__name__}: {exc}")
    _cpu_barrier()
    hooks = DistHooks(spec, rank=rank, local_rank=local_rank, world_size=world_size, opts=opts)
    result = run_cell(job["spec"], opts, hooks=hooks)
    result["rank_facts"] = dict(hooks.facts, backend=backend)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: torchrun ... -m harness.cell.rank JOB.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = job["prefix"]
    with open(rank_file(prefix, rank, "pid"), "w") as f:  # the launcher's backstop kills by these
        f.write(str(os.getpid()))
    import faulthandler

    faulthandler.enable(file=sys.stderr)
    _log(rank, f"pid {os.getpid()}, local rank {local_rank}, world size {world_size}")
    try:
        result = run_rank(job, rank, local_rank, world_size)
    except BaseException as exc:  # noqa: BLE001 - the process group itself failed
        import traceback

        from harness.core.record import is_oom_message

        text = f"{type(exc).__name__}: {exc}"
        result = {"status": "oom" if is_oom_message(text) else "error", "error": text[:2000],
                  "traceback": traceback.format_exc()[-4000:], "rank_facts": {"rank": rank, "local_rank": local_rank}}
        traceback.print_exc()
    write_atomic(rank_file(prefix, rank), result)
    if result.get("status") != "ok":
        _log(rank, f"cell ended {result.get('status')} on this rank: leaving now so torchrun stops the others")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CELL_FAILED)
    import torch.distributed as dist

    _cpu_barrier()  # every rank ended ok: leave together
    dist.destroy_process_group()
    _log(rank, "done")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: on CPU (gloo, FSDP2) a rank sometimes aborted there
    # ("terminate called without an active exception", SIGABRT) after its work was done.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
