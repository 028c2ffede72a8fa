"""Gradient checkpointing modes and the proof that the asked mode is in effect.

- ``off``: activations of every decoder layer stay on the device for the backward pass.
- ``on``: transformers' non-reentrant checkpointing; each decoder layer keeps only its
  input and is recomputed in the backward pass.
- ``offload``: like Unsloth's ``use_gradient_checkpointing="unsloth"``: each decoder
  layer's input hidden state is copied to pinned host memory (on a side stream on CUDA),
  the layer runs without saving activations, and in the backward pass the input is
  brought back and the layer recomputed. (Unsloth falls back to plain checkpointing
  below 512 tokens; this harness does not, so the mode is what it says at every length.)
  How the copy is made on CUDA is chosen by ``LORA_HARNESS_OFFLOAD_VARIANT`` (read when
  the mode is applied; ``benchmarks/offload_memory.py`` compares them; the record's
  evidence says which ran):
  ``record-stream`` (the default): a side stream copies, and ``hidden.record_stream``
  keeps the caching allocator from reusing the input's memory before the copy has read
  it (a block so freed is not reusable until the allocator sees the side stream's
  event complete); ``current-stream``: the copy runs on the current stream, in order
  with the compute, no side stream (as Unsloth's ``hidden.to("cpu", non_blocking=True)``);
  ``hold``: a side stream without ``record_stream``: the input is kept referenced
  until the next layer's forward (or the backward pass) starts, when the current stream
  waits for the copy's event and the reference is dropped (a plain free, in order).
  On the CPU all three make the same plain copy.

Evidence, collected on every step by :class:`Evidence`:
- layer runs in the forward and in the backward pass (a recomputation is a layer run
  during the backward pass), seen through forward pre-hooks on each decoder layer's
  children: version-proof across transformers releases that checkpoint ``__call__`` or
  ``forward``, and robust to early-stopped recomputation;
- bytes and tensors offloaded to host memory by the offload mode;
- bytes of distinct storages the autograd graph saved on the device outside checkpointed
  regions during the first forward pass (a probe on warm-up step 0 only, so measured
  steps carry no hook). Layer inputs kept by non-reentrant checkpointing are held by
  the checkpoint itself, not saved through autograd, so they are not in this figure;
- bytes of activations that custom autograd functions keep as plain attributes of their
  context (``ctx.A = A`` instead of ``ctx.save_for_backward(A)``), found by walking the
  graph after the first forward pass. Checkpointing works through saved-tensor hooks and
  cannot free such tensors: bitsandbytes' 8-bit matmul keeps its input this way
  (``MatMul8bitLt``: ``ctx.tensors = (CAt, subA, A)``; on CPU ``MatMul8bitFp``:
  ``ctx.A``), so with int8 every linear layer's input stays alive through the forward
  pass although each layer is recomputed in the backward pass.
"""

from __future__ import annotations

import itertools
import os
import warnings
from typing import Any

import torch


OFFLOAD_VARIANT_ENV = "LORA_HARNESS_OFFLOAD_VARIANT"
OFFLOAD_VARIANTS = ("record-stream", "current-stream", "hold")


def offload_variant() -> str:
    """How the offload mode copies layer inputs to the host (module docstring)."""
    v = os.environ.get(OFFLOAD_VARIANT_ENV, "").strip() or OFFLOAD_VARIANTS[0]
    if v not in OFFLOAD_VARIANTS:
        raise ValueError(f"{OFFLOAD_VARIANT_ENV}={v!r}: use one of {', '.join(OFFLOAD_VARIANTS)}")
    return v


class CheckpointProofError(RuntimeError):
    """The recorded evidence shows the checkpointing mode asked for was not in effect."""


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks transformers checkpoints (GradientCheckpointingLayer)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - very old transformers
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RuntimeError(f"{type(model).__name__} has no decoder layers transformers can checkpoint")
    return layers


class Evidence:
    """Counts layer runs per phase, offloaded bytes and saved-activation bytes."""

    def __init__(self, model) -> None:
        self.layers = decoder_layers(model)
        self.phase = "idle"
        self.pass_id = 0
        self._seen: set[tuple[int, int]] = set()
        self.layer_runs = {"forward": 0, "backward": 0}
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0
        self.saved_activation_bytes: int | None = None
        self.ctx_held_bytes: int | None = None
        self.ctx_held_by_function: dict[str, dict[str, int]] = {}
        self.offload_variant: str | None = None
        self.proof: str | None = None  # how the mode is proven where not by counting every step
        self._frozen: tuple | None = None  # the counts when stop() was called
        self.held: list = []  # offload variant "hold": (layer input, its copy's event) until released
        self._handles = []
        for idx, layer in enumerate(self.layers):
            for child in layer.children():
                self._handles.append(child.register_forward_pre_hook(self._make_hook(idx)))

    def _make_hook(self, idx: int):
        def hook(module, args):
            if self.phase in self.layer_runs:
                key = (self.pass_id, idx)
                if key not in self._seen:
                    self._seen.add(key)
                    self.layer_runs[self.phase] += 1
        return hook

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.pass_id += 1

    def leave(self) -> None:
        self.phase = "idle"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stop(self) -> None:
        """Stop counting and keep the counts so far: a compiled cell's later steps must not
        trace these hooks (they would be compiled into its graph, or break it)."""
        self.remove()
        self._frozen = (dict(self.layer_runs), self.offloaded_tensors, self.offloaded_bytes, self.pass_id)
        self.proof = "first step" if not self.proof else f"first step; {self.proof}"

    def probe_saved(self, device: torch.device, model=None):
        """Context manager: sum the bytes autograd saves on ``device`` (first forward only).

        Parameters and buffers of ``model`` are left out: a linear layer saves its weight
        for the backward pass, but the weight is not an activation.
        """
        ev = self
        total = [0]
        seen: set[int] = set()
        if model is not None:
            for t in itertools.chain(model.parameters(), model.buffers()):
                t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards are DTensors
                seen.add(t.untyped_storage().data_ptr())

        def pack(t):
            # Count each storage once: one activation saved by several ops (q, k and v
            # projections all save their input) occupies memory once.
            if t.device == device:
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total[0] += st.nbytes()
            return t

        class _Probe:
            def __enter__(self_inner):
                self_inner.cm = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                self_inner.cm.__enter__()

            def __exit__(self_inner, *exc):
                self_inner.cm.__exit__(*exc)
                ev.saved_activation_bytes = total[0]
                return False

        return _Probe()

    def probe_ctx_held(self, loss, device: torch.device, model=None) -> None:
        """Sum the device bytes held as attributes of custom autograd contexts.

        Walks the graph behind ``loss`` (call it between forward and backward). Tensors a
        custom ``torch.autograd.Function`` stores on ``ctx`` directly live as long as the
        graph, whatever checkpointing does; parameters, buffers and the offload mode's
        own host copies are left out.
        """
        skip: set[int] = set()
        if model is not None:
            for t in itertools.chain(model.parameters(), model.buffers()):
                t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards are DTensors
                skip.add(t.untyped_storage().data_ptr())
        counted: set[int] = set()
        by_fn: dict[str, dict[str, int]] = {}
        total = 0
        todo = [loss.grad_fn] if loss.grad_fn is not None else []
        visited: set[int] = set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            todo.extend(fn for fn, _ in getattr(node, "next_functions", ()))
            attrs = getattr(node, "__dict__", None)
            fwd = getattr(node, "_forward_cls", None)
            if not attrs or fwd is None or fwd is _OffloadedLayer:
                continue
            name = getattr(fwd, "__name__", type(node).__name__)
            for t in _tensors_in(attrs.values()):
                t = t.to_local() if hasattr(t, "to_local") else t
                if t.device != device:
                    continue
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr in skip or ptr in counted:
                    continue
                counted.add(ptr)
                total += st.nbytes()
                entry = by_fn.setdefault(name, {"bytes": 0, "tensors": 0})
                entry["bytes"] += st.nbytes()
                entry["tensors"] += 1
        self.ctx_held_bytes = total
        self.ctx_held_by_function = by_fn

    def to_dict(self, mode: str, steps: int) -> dict[str, Any]:
        runs, off_tensors, off_bytes = self.layer_runs, self.offloaded_tensors, self.offloaded_bytes
        if self._frozen is not None:  # counted over the first step only
            runs, off_tensors, off_bytes, _ = self._frozen
            steps = 1
        return {
            "mode": mode,
            "decoder_layers": len(self.layers),
            "steps_observed": steps,
            "layer_runs_forward": runs["forward"],
            "layer_recomputes": runs["backward"],
            "offloaded_tensors": off_tensors,
            "offloaded_bytes": off_bytes,
            "saved_activation_bytes_step0": self.saved_activation_bytes,
            "ctx_held_activation_bytes_step0": self.ctx_held_bytes,
            "ctx_held_by_function": self.ctx_held_by_function or None,
            **({"offload_variant": self.offload_variant} if mode == "offload" else {}),
        }


def verify(mode: str, ev: dict[str, Any]) -> list[str]:
    """Problems with the evidence for ``mode``; an empty list means proven."""
    fwd, rec = ev["layer_runs_forward"], ev["layer_recomputes"]
    problems = []
    if fwd == 0:
        problems.append("no decoder layer ran in the forward pass")
        return problems
    if mode == "off":
        if rec:
            problems.append(f"{rec} layer recomputations in the backward pass, expected none")
        if ev["offloaded_tensors"]:
            problems.append(f"{ev['offloaded_tensors']} tensors offloaded, expected none")
    else:
        if rec != fwd:
            problems.append(
                f"{rec} layer recomputations for {fwd} layer runs: checkpointing was not in effect"
                + (" (model in eval mode?)" if rec == 0 else "")
            )
        if mode == "on" and ev["offloaded_tensors"]:
            problems.append(f"{ev['offloaded_tensors']} tensors offloaded in mode 'on', expected none")
        # Unsloth's offload is its own (stack_proof shows its checkpoint function in place)
        if mode == "offload" and ev.get("offload_variant") != "unsloth" and ev["offloaded_tensors"] != fwd:
            problems.append(f"{ev['offloaded_tensors']} layer inputs offloaded for {fwd} layer runs")
    return problems


def _tensors_in(values, depth: int = 0):
    for v in values:
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, (tuple, list)) and depth < 2:
            yield from _tensors_in(v, depth + 1)


def ctx_held_warning(mode: str, ev: dict[str, Any]) -> str | None:
    """A warning when checkpointing is on but custom autograd contexts keep activations."""
    held = ev.get("ctx_held_activation_bytes_step0")
    if mode == "off" or not held:
        return None
    fns = ", ".join(sorted(ev.get("ctx_held_by_function") or {})) or "custom autograd functions"
    return (f"{held / 2**20:.1f} MiB of activations held on autograd contexts by {fns} during the forward pass: "
            f"gc-{mode} cannot free them (they are not saved through saved-tensor hooks)")


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without saving activations; keep its input in host memory."""

    @staticmethod
    def forward(ctx, run, ev: Evidence, hidden: torch.Tensor, *rest):
        ctx.run, ctx.rest, ctx.device, ctx.ev = run, rest, hidden.device, ev
        ctx.cpu_rng = torch.get_rng_state()
        ctx.dev_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.copied = None
        if hidden.is_cuda:
            _release_held(ev, hidden.device)
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            if ev.offload_variant == "current-stream":
                host.copy_(hidden.detach(), non_blocking=True)  # in order with the compute
            else:
                stream = _side_stream(hidden.device)
                stream.wait_stream(torch.cuda.current_stream(hidden.device))
                with torch.cuda.stream(stream):
                    host.copy_(hidden.detach(), non_blocking=True)
                    ctx.copied = torch.cuda.Event()
                    ctx.copied.record(stream)
                if ev.offload_variant == "hold":
                    ev.held.append((hidden, ctx.copied))
                else:
                    # The caching allocator must not hand hidden's memory to another tensor
                    # until the side stream's copy has read it.
                    hidden.record_stream(stream)
        else:
            host = hidden.detach().clone()
        ctx.host = host
        ev.offloaded_tensors += 1
        ev.offloaded_bytes += host.numel() * host.element_size()
        with torch.no_grad():
            return ctx.run(hidden, *rest)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.device.type == "cuda":
            _release_held(ctx.ev, ctx.device)
            if ctx.copied is not None:
                torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
            hidden = ctx.host.to(ctx.device, non_blocking=True)
        else:
            hidden = ctx.host
        hidden = hidden.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.dev_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.dev_rng is not None:
                torch.cuda.set_rng_state(ctx.dev_rng, ctx.device)
            out = ctx.run(hidden, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.host = None
        return (None, None, hidden.grad) + (None,) * len(ctx.rest)


_STREAMS: dict[Any, Any] = {}


def _release_held(ev: Evidence, device) -> None:
    """Variant "hold": drop the layer inputs kept for their copies, once the current
    stream has been told to wait for those copies (so reuse of their memory, which the
    allocator orders on this stream, comes after the copy has read it)."""
    if ev.held:
        current = torch.cuda.current_stream(device)
        for _, copied in ev.held:
            current.wait_event(copied)
        ev.held.clear()


def _side_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _offload_func(ev: Evidence):
    def checkpoint_offloaded(run, hidden, *rest):
        return _OffloadedLayer.apply(run, ev, hidden, *rest)
    return checkpoint_offloaded


def transformers_flag(model) -> bool:
    """What transformers itself says about checkpointing (named differently by version)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in type(base).__dict__ or any(name in k.__dict__ for k in type(base).__mro__):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return bool(getattr(base, name))
    return False


def apply(model, mode: str) -> Evidence:
    """Put ``model`` (a transformers model, before LoRA wrapping) in checkpointing ``mode``.

    Returns the :class:`Evidence` recorder the training loop must drive.
    """
    ev = Evidence(model)
    if mode == "off":
        if transformers_flag(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.gradient_checkpointing_disable()
        return ev
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # renamed activation_checkpointing_* in newer releases
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With frozen embeddings the first layer's input does not require grad; the LoRA
    # weights inside a recomputed layer only get gradients if it does.
    model.enable_input_require_grads()
    if mode == "offload":
        ev.offload_variant = offload_variant()
        fn = _offload_func(ev)
        for layer in ev.layers:
            layer._gradient_checkpointing_func = fn
    return ev
