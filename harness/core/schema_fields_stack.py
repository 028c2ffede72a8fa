"""The record's fields, part 3: the training stack, torch.compile and the attention kernel.

Pure data, which ``harness.core.schema`` registers. Every cell records the allocator
setting it ran with, the attention implementation its layers use and its stack's
package versions; a Liger or Unsloth cell adds ``stack_proof`` (what shows the stack was
in effect) and a ``--compile`` cell its compiler counters. All appeared in schema
version 2.
"""

from __future__ import annotations

from harness.core.field import Field as F

_CELL = (
    F("pytorch_alloc_conf", "str", None, "stack", "PYTORCH_ALLOC_CONF the cell's process ran with: set explicitly "
      "for every cell (the caller's value, else expandable_segments:False, torch's default), because Unsloth sets "
      "expandable_segments:True at import when it is unset and memory figures would then differ by stack", since=2),
    F("attn_implementation_after_load", "str", None, "stack", "model.config._attn_implementation right after "
      "loading", since=2),
    F("attn_implementation_used", "str", None, "stack", "the attention implementation every attention layer's "
      "config names after the LoRA wrap (several, comma-joined, if they differ); not spec.attn_implementation "
      "makes the cell an error", since=2),
    F("stack_versions", "object", None, "stack", "the versions of the packages that make the cell's stack "
      "(hf: transformers, peft; liger: liger-kernel, triton; unsloth: unsloth, unsloth_zoo, trl, triton)", since=2),
    F("stack_proof", "object", None, "stack", "Liger and Unsloth cells: what shows the stack was in effect (keys "
      "below); a failed check makes the cell an error", since=2),
    F("compile_s", "float", "s", "stack", "--compile: the first compiled step's time minus the median of the later "
      "steps, i.e. the compilation it paid (kept out of the measured steps and of fixed_cost_s' steps)", since=2,
      metric=True, better="lower", table="compile"),
    F("compile_first_step_s", "float", "s", "stack", "--compile: the first compiled step's whole time (the second "
      "warm-up step; the first runs uncompiled)", since=2),
    F("compile_counters", "object", None, "stack", "--compile: torch._dynamo's counters over the cell (keys below); "
      "zero compiled frames makes the cell an error", since=2),
)

_PROOF = tuple(F(f"stack_proof.{name}", typ, unit, "stack", doc, since=2) for name, typ, unit, doc in (
    ("proof", "str", None, "which stack's checks ran: liger or unsloth"),
    ("train_step_output", "str", None, "class of the first training step's output"),
    ("train_step_logits", "str", None, "its logits: None (fused linear cross-entropy never built them), a tensor's "
     "shape, or a sentinel's class (Unsloth's EmptyLogits)"),
    ("liger_modules", "object", None, "Liger: modules whose _get_name() is a Liger kernel, by name"),
    ("liger_modules_expected", "object", None, "Liger: those the architecture should have (RMSNorm: 2 per layer + "
     "the final norm; SwiGLU: 1 per layer)"),
    ("rope_function", "str", None, "Liger: the architecture module's apply_rotary_pos_emb (module.name)"),
    ("rope_impl", "str", None, "Liger: the kernel implementation its dispatcher resolves for RoPE "
     "(LIGER_KERNEL_BACKEND pins nvidia-triton)"),
    ("loss_forward", "str", None, "Liger: the module of the causal-LM forward the model runs (its fused "
     "linear cross-entropy forward)"),
    ("device_type", "str", None, "Unsloth: unsloth.DEVICE_TYPE (cuda, or cpu on its CPU fallback where nothing "
     "is patched)"),
    ("patched_forwards", "object", None, "Unsloth: forward functions of the architecture's attention, decoder layer, "
     "model and causal-LM classes, by class"),
    ("fast_path_modules", "int", "count", "Unsloth: modules of those classes marked _unsloth_fast_path (its patched "
     "forwards run only on those; the others get the original forward)"),
    ("modules", "int", "count", "Unsloth: modules of those classes in the model"),
    ("fused_lora", "object", None, "Unsloth: decoder layers whose q/k/v, o and MLP LoRA run its fused kernels "
     "(keys qkv, o, mlp, layers)"),
    ("gc_asked", "str", None, "Unsloth: use_gradient_checkpointing passed (False, True or unsloth)"),
    ("checkpoint_function", "str", None, "Unsloth: torch.utils.checkpoint.CheckpointFunction's name "
     "(UnslothCheckpointFunction with its offloaded mode)"),
    ("transformers_checkpoint", "str", None, "Unsloth: transformers.modeling_utils.checkpoint's name "
     "(unsloth_checkpoint with its offloaded mode)"),
    ("layer_checkpoint_functions", "list", None, "Unsloth: the checkpoint function each decoder layer calls, distinct"),
    ("attention_backend", "str", None, "Unsloth: its attention dispatch's choice (sdpa, xformers, flash_dense)"),
    ("has_flash_attention", "bool", None, "Unsloth: flash-attn usable"),
    ("has_xformers", "bool", None, "Unsloth: xformers usable"),
))

_COMPILE = tuple(F(f"compile_counters.{name}", typ, unit, "stack", doc, since=2) for name, typ, unit, doc in (
    ("backend", "str", None, "torch.compile's backend"),
    ("frames_total", "int", "count", "frames handed to Dynamo (recompiles and resume functions after breaks count)"),
    ("frames_ok", "int", "count", "those converted without error"),
    ("unique_graphs", "int", "count", "FX graphs compiled"),
    ("graph_breaks", "int", "count", "graph breaks, summed over their reasons (a recompiled frame counts again)"),
    ("graph_break_reasons", "object", None, "the first line of each break's reason and its count (at most 5)"),
    ("recompiles", "int", "count", "compilations with a recompile reason (torch._dynamo.utils."
     "get_compilation_metrics)"),
    ("recompiles_measured", "int", "count", "of those, during the measured steps (then the window paid compilation)"),
    ("fxgraph_cache_hits", "int", "count", "Inductor graphs taken from its cache (a warm cache compiles much faster)"),
    ("fxgraph_cache_misses", "int", "count", "Inductor graphs compiled afresh"),
))

_EVIDENCE = (
    F("grad_ckpt_evidence.proof", "str", None, "proofs", "how checkpointing was proven where not by the harness's "
      "counters over every step: 'first step' (--compile: compiled steps carry no hooks) or 'unsloth' (its own "
      "checkpoint function, see stack_proof)", since=2),
)

FIELDS = (*_CELL, *_PROOF, *_COMPILE, *_EVIDENCE)
