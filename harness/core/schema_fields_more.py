"""The record's fields, part 2: phase timers, loading, precision, inputs, the host, the GPU
pool, torchrun cells, and the keys inside the record's objects. Pure data, registered by
``harness.core.schema`` on import (part 1: ``schema_fields``)."""

from __future__ import annotations

from harness.core.field import Field as F

_PHASE_DOCS = (
    ("spawn", "job sent -> first line of the job in the new process"),
    ("imports", "that first line -> the cell's imports done"),
    ("checkpoint_write", "writing (or looking up) the synthetic checkpoint"),
    ("device_init", "NVML baseline, sampler start, CUDA context and cuBLAS handle, capability check"),
    ("model_load", "building or loading the model"),
    ("lora_wrap", "checkpointing hooks, get_peft_model, layer counts and precision proof, optimizer"),
    ("data_prep", "the warm-up and minimum measured batches, as CPU tensors"),
    ("warmup", "the warm-up steps' loop iterations"),
    ("measured", "the measured steps' loop iterations and the adaptive window's decision"),
    ("verify", "final synchronisation, energy counter, checkpointing proof, FLOPs per token"),
    ("teardown", "end of the cell's work -> the parent saw its process end"),
)

_PHASES = tuple(F(f"phase_{name}_s", "float", "s", "phases", doc, metric=True, better="lower")
                for name, doc in _PHASE_DOCS) + (
    F("phase_unaccounted_s", "float", "s", "phases", "wall_time_s minus the sum of the phases (~0)", metric=True),
    F("fixed_cost_s", "float", "s", "phases", "wall_time_s - phase_warmup_s - phase_measured_s: what a cell "
      "costs besides its steps", metric=True, better="lower", table="fixed cost"),
    F("load_time_s", "float", "s", "phases", "the model loader's own timer (inside phase_model_load_s + "
      "phase_checkpoint_write_s)", metric=True, better="lower", table="model load"),
    F("checkpoint_prepare_s", "float", "s", "phases", "writing or looking up the synthetic checkpoint, inside the "
      "load", metric=True, better="lower"),
    F("gc_frozen_objects", "int", "count", "phases", "objects the worker froze out of the collector's reach "
      "before the job (gc.freeze)"),
    F("gc_pauses", "object", None, "phases", "Python's collections during the warm-up and measured steps (keys "
      "below)"),
)

_LOAD = (
    F("load_path", "str", None, "load", "config (built from the config), pretrained (from_pretrained on a "
      "checkpoint) or config-meta (FSDP: built on the meta device)"),
    F("checkpoint", "str", None, "load", "the checkpoint folder a pretrained load read"),
    F("checkpoint_written_before_cell", "bool", None, "load", "the cell first wrote the checkpoint it loads, "
      "before its measurements started"),
    F("checkpoint_written_in_cell", "bool", None, "load", "the cell wrote the checkpoint inside its load (a CPU "
      "host)"),
    F("checkpoint_prequantized", "bool", None, "load", "an int8 cell loaded the pre-quantised int8 checkpoint "
      "(--int8-prequantized)"),
    F("loaded_in_training_mode", "bool", None, "load", "whether the loader returned a model in training mode"),
    F("trainable_params", "int", "params", "load", "parameters with requires_grad (LoRA's only)", metric=True),
    F("total_params", "int", "params", "load", "all parameters of the LoRA model", metric=True),
)

_PRECISION = (
    F("compute_dtype", "str", None, "precision", "the dtype the frozen weights compute in"),
    F("autocast_dtype", "str", None, "precision", "torch.autocast's dtype (null for fp32)"),
    F("adapter_dtype", "str", None, "precision", "the LoRA matrices' dtype"),
    F("loss_scaling", "bool", None, "precision", "whether a GradScaler scaled the loss (fp16 compute)"),
    F("scaler_skipped_steps", "int", "steps", "precision", "steps the scaler skipped for inf/nan gradients "
      "(null without loss scaling)", metric=True, better="lower"),
    F("lora_input_cast", "bool", None, "precision", "whether peft cast each LoRA layer's input to the adapter's "
      "dtype (spec.lora.input_cast; --lora-no-input-cast turns it off)"),
)

_LOSS = (
    F("nonfinite_losses", "int", "steps", "loss", "steps whose loss was not finite", metric=True, better="lower"),
    F("nonfinite_message", "str", None, "loss", "one sentence on the first non-finite loss: an fp16 overflow "
      "and where, or where a NaN was first produced"),
    F("nonfinite_diagnosis", "object", None, "loss", "the details behind it: step, loss, kind (overflow, nan, "
      "loss), scope, first_nonfinite module, fp32_peak_abs (the scope replayed in float32)"),
)

_INPUTS = (
    F("model_kind", "str", None, "inputs", "causal-lm or vision-language"),
    F("image_count", "int", "count", "inputs", "images per sequence"),
    F("loss_tokens", "int", "tokens", "inputs", "label positions the loss counts per sequence (image "
      "placeholders masked)"),
    F("image_size_px", "int", "px", "vlm", "the images' edge (square images)"),
    F("image_grid_thw", "list", None, "vlm", "[t, h, w] patch grid of each image"),
    F("vision_patches", "int", "count", "vlm", "vision tower rows per sequence"),
    F("vision_matmul_params", "int", "params", "vlm", "the vision tower's frozen matmul parameters"),
    F("vision_lora_matmul_params", "int", "params", "vlm", "the vision tower's LoRA matmul parameters"),
    F("vision_flops_per_step", "float", "FLOPs/step", "vlm", "the tower's matmul FLOPs per step (included in "
      "flops_per_token)"),
)

_HOST = (
    F("hostname", "str", None, "host", "the host the cell ran on (the sweep's; with --ray the node's)"),
    F("gpu_name", "str", None, "host", "the GPU model: the worker's CUDA device name, else the host's (null on a "
      "CPU host); reports derive gpu_model from it"),
    F("device", "str", None, "host", "cuda or cpu"),
    F("device_name", "str", None, "host", "the CUDA device's name, or cpu", bench=True),
    F("worker_mode", "str", None, "host", "how the worker server started cells: fork or spawn"),
    F("worker_pid", "int", None, "host", "the cell's process id"),
    F("cuda_visible_devices", "str", None, "host", "CUDA_VISIBLE_DEVICES in the cell's process (null when unset); "
      "with --gpus the pinned GPU's UUID"),
)

_POOL = (
    F("gpu_index", "int", None, "gpu-pool", "NVML index of the GPU the cell's sampler read (a --gpus or --ray cell "
      "that died before saying gets the one it was pinned to; with --ray, on its node)", bench=True),
    F("gpu_uuid", "str", None, "gpu-pool", "that GPU's UUID"),
    F("gpu_pool", "list", None, "gpu-pool", "NVML indexes of the GPUs a --gpus sweep ran on"),
    F("gpu_pin_mismatch", "bool", None, "gpu-pool", "only when true: the GPU the worker read is not the one it "
      "was pinned to"),
)

_RAY = (
    F("ray_node", "str", None, "ray", "hostname of the Ray node the cell ran on", since=2),
    F("ray_node_ip", "str", None, "ray", "that node's IP address", since=2),
    F("ray_node_id", "str", None, "ray", "that node's Ray id (unique where hostnames repeat, e.g. containers)",
      since=2),
    F("ray_gpu_id", "str", None, "ray", "the GPU id Ray gave the cell's worker (CUDA_VISIBLE_DEVICES as Ray set "
      "it; the worker pins that GPU by UUID)", since=2),
    F("ray_requeued", "int", None, "ray", "only on a cell whose worker (process, fork server or node) was lost "
      "while running it: how often; it ran again after each loss, and is a crash after three", since=2),
)

_PER_RANK_DOCS = (
    ("status", "str", "each rank's own outcome (null: the rank wrote no record)"),
    ("error", "str", "each rank's own error"),
    ("peak_vram_bytes", "bytes", "NVML peak, each rank sampling its own GPU"),
    ("peak_vram_over_baseline_bytes", "bytes", "NVML peak over that GPU's baseline"),
    ("baseline_vram_bytes", "bytes", "each GPU's NVML baseline"),
    ("torch_peak_allocated_bytes", "bytes", "each rank's allocator peak allocated"),
    ("torch_peak_reserved_bytes", "bytes", "each rank's allocator peak reserved"),
    ("peak_rss_bytes", "bytes", "each rank's host memory peak"),
    ("step_time_s", "s/step", "each rank's median step"),
    ("tokens_per_s", "tokens/s", "each rank's own tokens / that step"),
    ("energy_j", "J", "each rank's NVML energy"),
    ("losses", None, "each rank's loss curve (its own batches)"),
    ("pid", None, "each rank's process id"),
    ("nvml_index", None, "the NVML device a rank sampled"),
    ("device_uuid", None, "the rank's CUDA device's UUID"),
    ("nvml_uuid_match", None, "whether the NVML device and the CUDA device are the same GPU (null on CPU)"),
    ("lora_checksum", None, "sha256 (16 hex digits) of the full LoRA weights after training (FSDP shards "
     "gathered)"),
)

_DIST = (
    F("world_size", "int", None, "dist", "processes (GPUs) the cell ran on; only on torchrun records"),
    F("parallel", "str", None, "dist", "ddp or fsdp; only on torchrun records"),
    F("launcher", "str", None, "dist", "torchrun"),
    F("dist_backend", "str", None, "dist", "cpu:gloo,cuda:nccl on GPUs, gloo on a CPU host"),
    F("torchrun_exit_code", "int", None, "dist", "how torchrun ended (non-zero whenever a rank failed)"),
    F("torchrun_signal", "int", None, "dist", "the signal that ended torchrun, if any"),
    F("ranks_reported", "int", "count", "dist", "ranks that wrote a record"),
) + tuple(F(f"per_rank_{name}", "list", unit, "dist", doc, per="rank") for name, unit, doc in _PER_RANK_DOCS) + (
    F("lora_in_sync", "bool", None, "dist", "all ranks' LoRA checksums are equal (the gradients were "
      "synchronised); false makes the cell an error"),
    F("per_gpu_tokens_per_s", "float", "tokens/s", "dist", "tokens_per_s / world_size", metric=True,
      better="higher", table="tokens/s per GPU"),
    F("failed_rank", "int", None, "dist", "on a failed cell: the rank whose failure names it"),
    F("scaling_efficiency", "float", "fraction", "dist", "tokens_per_s / (world_size x tokens_per_s of the same "
      "cell at world size 1, from this run folder)", metric=True, better="higher", table="scaling efficiency"),
    F("scaling_baseline_cell", "str", None, "dist", "the world-size-1 cell it was compared with"),
    F("single_gpu_tokens_per_s", "float", "tokens/s", "dist", "that cell's tokens_per_s", metric=True),
    F("scaling_efficiency_reason", "str", None, "dist", "why scaling_efficiency is null"),
    F("ddp_options", "object", None, "dist", "DDP's keyword arguments (gradient_as_bucket_view; static_graph with "
      "checkpointing offload)"),
    F("fsdp", "object", None, "dist", "api (fully_shard), units (decoder layers + 1), materialise_s (seconds to "
      "allocate and fill the shards)"),
)

_EVIDENCE = tuple(F(f"grad_ckpt_evidence.{name}", typ, unit, "proofs", doc) for name, typ, unit, doc in (
    ("mode", "str", None, "the mode asked for"),
    ("decoder_layers", "int", "count", "layers transformers can checkpoint (a VLM's vision blocks included)"),
    ("steps_observed", "int", "steps", "steps the counters ran over (warm-up included)"),
    ("layer_runs_forward", "int", "count", "decoder layer runs during forward passes"),
    ("layer_recomputes", "int", "count", "decoder layer runs during backward passes (recomputations)"),
    ("offloaded_tensors", "int", "count", "layer inputs moved to host memory (offload mode)"),
    ("offloaded_bytes", "int", "bytes", "their size"),
    ("saved_activation_bytes_step0", "int", "bytes", "distinct storages autograd saved on the device outside "
     "checkpointed layers in the first forward pass (under FSDP also the all-gathered weights)"),
    ("ctx_held_activation_bytes_step0", "int", "bytes", "device bytes custom autograd functions kept as plain "
     "ctx attributes after the first forward: no saved-tensor-hook checkpointing can free them"),
    ("ctx_held_by_function", "object", None, "those bytes and tensor counts by autograd function (null: none)"),
    ("lora_params", "int", "count", "LoRA parameters"),
    ("lora_params_with_grad", "int", "count", "LoRA parameters that received a gradient in step 1"),
    ("model_training_mode", "bool", None, "whether every decoder layer was in training mode"),
    ("transformers_gc_enabled", "bool", None, "what transformers reports"),
))

_LAYERS = tuple(F(f"loaded_layers.{name}", typ, None, "proofs", doc) for name, typ, doc in (
    ("linear4bit", "object", "4-bit layers: count, quant_types, double_quant, compute_dtypes"),
    ("linear8bit", "object", "8-bit layers: count"),
    ("linear", "object", "plain nn.Linear base layers: count, dtypes"),
    ("unexpected_plain", "list", "in quantised modes, linear layers outside the modules kept in 16-bit on purpose"),
    ("unexpected_plain_count", "int", "how many"),
    ("kept_unquantized", "object", "in quantised modes, the plain layers each kept-in-16-bit module holds"),
    ("lora_layers", "int", "layers wrapped with LoRA"),
    ("lora_adapter_dtypes", "object", "LoRA A/B matrices by dtype"),
))

_OBJECTS = (
    F("prediction.supported", "bool", None, "outcome", "whether the rules expect the cell to run"),
    F("prediction.rule", "str", None, "outcome", "the first rule that fired (null: none)"),
    F("prediction.reason", "str", None, "outcome", "its reason"),
    F("prediction.fired", "list", None, "outcome", "every [rule, reason] that fired"),
    F("gc_pauses.collections", "list", "count", "phases", "collections per generation [gen0, gen1, gen2]"),
    F("gc_pauses.seconds", "list", "s", "phases", "their total time per generation"),
)

FIELDS = (*_PHASES, *_LOAD, *_PRECISION, *_LOSS, *_INPUTS, *_HOST, *_POOL, *_RAY, *_DIST, *_EVIDENCE, *_LAYERS, *_OBJECTS)
