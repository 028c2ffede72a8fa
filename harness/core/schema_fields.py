"""The record's fields, part 1: what every cell's record can hold (one process, one GPU).

Pure data, which ``harness.core.schema`` registers; part 2
(``schema_fields_more``) holds the multi-GPU, GPU-pool and nested fields. The fields every
record carries come first, in the order a record is written.
"""

from __future__ import annotations

from harness.core.field import Field as F

_ALWAYS = (
    F("schema_version", "int", None, "identity", "version of this schema the record was written in",
      always=True),
    F("run_id", "str", None, "identity", "the run folder's name", always=True),
    F("cell_id", "str", None, "identity", "the cell's stable id (format above)", always=True, bench=True),
    F("status", "str", None, "outcome", "ok, oom, unsupported, error, crash or timeout (meanings above)",
      always=True, bench=True),
    F("error", "str", None, "outcome", "why the cell is not ok; its first line is the summary (null when ok)",
      always=True, bench=True),
    F("model", "str", None, "axes", "model preset, or a local checkpoint's short name", always=True),
    F("precision", "str", None, "axes", "fp32, bf16, fp16, int8, nf4, fp4 or nf4-dq", always=True),
    F("seq_len", "int", "tokens", "axes", "tokens per sequence", always=True),
    F("batch_size", "int", None, "axes", "sequences per step", always=True),
    F("grad_ckpt", "str", None, "axes", "activation checkpointing mode: off, on or offload", always=True),
    F("stack", "str", None, "axes", "training stack: hf (transformers + peft), liger or unsloth (spec.stack; older "
      "records read hf)", always=True, since=2, default="hf"),
    F("step_time_s", "float", "s/step", "speed", "median measured step time (warm-up excluded)", always=True,
      metric=True, better="lower", bench=True, step_band=True),
    F("tokens_per_s", "float", "tokens/s", "speed", "batch x seq_len / step_time_s", always=True, metric=True,
      better="higher", bench=True, step_band=True),
    F("peak_vram_bytes", "int", "bytes", "memory", "NVML device 'used' peak over the cell: every process, the "
      "CUDA context included (null without NVML, on a CPU, or with the sampler off)", always=True, metric=True,
      better="lower", bench=True),
    F("peak_rss_bytes", "int", "bytes", "memory", "the worker's peak resident host memory (the kernel's "
      "high-water mark)", always=True, metric=True, better="lower", bench=True),
    F("torch_peak_allocated_bytes", "int", "bytes", "memory", "torch CUDA allocator: peak allocated since "
      "training started", always=True, metric=True, better="lower", bench=True),
    F("torch_peak_reserved_bytes", "int", "bytes", "memory", "torch CUDA allocator: peak reserved since "
      "training started", always=True, metric=True, better="lower", bench=True),
    F("loaded_layers", "object", None, "proofs", "linear layer counts by kind (keys below)", always=True),
    F("grad_ckpt_evidence", "object", None, "proofs", "what the checkpointing counters saw (keys below)",
      always=True),
    F("losses", "list", None, "loss", "the loss of every step, warm-up steps first", always=True, per="step"),
    F("mfu", "float", "fraction", "compute", "model FLOPs utilisation of the measured steps (null where the "
      "device's peak is unknown)", always=True, metric=True, better="higher", bench=True, step_band=True),
    F("text_tokens", "int", "tokens", "inputs", "text tokens per sequence (vision markers count as text); "
      "text_tokens + image_tokens = seq_len; null if the cell failed before its batches were built",
      always=True),
    F("image_tokens", "int", "tokens", "inputs", "image placeholder tokens per sequence (0 for a text model)",
      always=True),
    F("spec", "object", None, "identity", "the whole CellSpec: LoRA settings, optimizer, lr, steps, seed, load "
      "path, ... (keys below; older specs read with today's defaults)", always=True),
)

_RUN = (
    F("suite", "str", None, "identity", "compat or stability for cells of those suites; absent for matrix cells"),
    F("timestamp", "str", None, "identity", "when the cell ended (ISO 8601, local time with offset)"),
    F("resumed", "bool", None, "identity", "true on a record replayed from the run folder (resume, fit reuse); "
      "set in memory only, never written"),
    F("warnings", "list", None, "outcome", "facts that do not fail the cell but change how to read it; absent "
      "when none"),
    F("phase", "str", None, "outcome", "on a failure: where it happened (check, load, prepare, train, verify)"),
    F("oom_phase", "str", None, "outcome", "on an oom: the phase that ran out of memory"),
    F("traceback", "str", None, "outcome", "on an error: the end of the Python traceback"),
    F("prediction", "object", None, "outcome", "what the capability rules said before the cell ran (keys "
      "below); on every record the sweep writes"),
    F("predicted_unsupported", "bool", None, "outcome", "the rules predicted the cell cannot run here: recorded "
      "unsupported, never started"),
    F("pruned", "bool", None, "outcome", "an oom recorded without running: a shorter cell of the same row ran "
      "out of memory"),
    F("pruned_by", "str", None, "outcome", "the cell whose oom pruned this one"),
    F("log", "str", None, "outcome", "the cell's log, relative to the run folder"),
    F("exit_code", "int", None, "outcome", "the worker process's exit code"),
    F("exit_signal", "int", None, "outcome", "the signal that ended the worker process, if any"),
    F("wall_time_s", "float", "s", "phases", "the parent's wall time of the cell: job sent -> the cell's process "
      "seen to end (0 for cells never started)", metric=True, better="lower", bench=True),
)

# What makes two records the same measurement, and how far a record's numbers can be
# trusted (schema version 2).
_TRUST = (
    F("fingerprint", "str", None, "identity", "hash of every setting that changes the numbers (harness.core."
      "fingerprint): records of one cell id are the same measurement only when theirs match; older records get "
      "theirs from their spec", since=2),
    F("measurement_opts", "object", None, "identity", "the worker settings in the fingerprint: the NVML "
      "sampler's period and mode, int8 pre-quantised loading", since=2),
    F("repeat", "int", None, "identity", "n for the n-th repeat of a cell with the same settings in one run folder "
      "(absent on a first measurement)", since=2),
    F("stable", "bool", None, "quality", "whether the measured steps agree: step_time_spread within "
      "harness.core.steps.STABLE_SPREAD (null with fewer than 3 measured steps); tokens/s of an unstable cell is "
      "not a figure to compare", since=2, table="stable"),
    F("load_avg_before", "float", None, "quality", "the host's 1-minute load average when the cell started",
      since=2),
    F("load_avg_after", "float", None, "quality", "the host's 1-minute load average when its measured steps "
      "ended", since=2),
    F("cpu_count", "int", None, "quality", "CPUs this process may run on (the load average's scale)", since=2),
    F("host_busy", "bool", None, "quality", "the load average exceeded the CPUs available before or during the "
      "cell: other work competed for the host", since=2),
    F("gpu_other_processes", "int", None, "quality", "compute processes of others on the cell's GPU (NVML; "
      "containers often hide them: null when NVML lists none of ours either)", since=2),
    F("gpu_busy_fraction", "float", "fraction", "quality", "fraction of a profiled training step during which "
      "the GPU ran a kernel or copy (one extra step after the measured window)", since=2, table="GPU busy"),
    F("host_bound", "bool", None, "quality", "gpu_busy_fraction under harness.core.steps.HOST_BOUND_BELOW: the "
      "step waits on the host CPU, and its tokens/s measure the CPU more than the GPU", since=2,
      table="host-bound"),
    F("gpu_kernels_per_step", "int", None, "quality", "kernels the profiled step launched", since=2),
    F("gpu_kernel_median_us", "float", "us", "quality", "the profiled step's median kernel duration", since=2),
    F("gpu_busy_error", "str", None, "quality", "why the profiled step gave no busy fraction", since=2),
    F("waited_for_checkpoint_writer_s", "float", "s", "quality", "seconds the cell waited, before measuring "
      "anything, for a synthetic checkpoint another process was writing on the same host", since=2),
    F("quality_notes", "list", None, "quality", "why a cell's speed figures are not to be compared (unstable, "
      "host busy, host-bound); absent when none", since=2),
)

_SPEED = (
    F("step_times_s", "list", "s/step", "speed", "every measured step's time", per="step"),
    F("warmup_step_times_s", "list", "s/step", "speed", "the warm-up steps' times", per="step"),
    F("step_time_p90_s", "float", "s/step", "speed", "90th percentile of the measured step times", metric=True,
      better="lower", bench=True),
    F("step_time_spread", "float", "fraction", "speed", "(max - min) / median of the measured step times",
      metric=True, better="lower"),
    F("measured_steps", "int", "steps", "speed", "measured steps that ran"),
    F("window_rule", "str", None, "speed", "what ended the measured window: fixed (exactly spec.steps), or with "
      "spec.window stable, time_cap or max_steps"),
    F("flops_per_token", "float", "FLOPs/token", "compute", "training matmul FLOPs per token (a VLM's vision "
      "tower included)", metric=True),
    F("frozen_matmul_params", "int", "params", "compute", "frozen matmul parameters (a VLM's language model only)"),
    F("lora_matmul_params", "int", "params", "compute", "LoRA matmul parameters (a VLM's language model only)"),
    F("peak_flops", "float", "FLOP/s", "compute", "the device's dense datasheet peak for the compute dtype",
      metric=True),
    F("energy_j", "float", "J", "energy", "NVML energy counter over the measured steps", metric=True,
      better="lower", table="energy"),
    F("energy_per_token_j", "float", "J/token", "energy", "energy_j / measured tokens", metric=True,
      better="lower", bench=True),
)

_MEMORY = (
    F("memory_metric", "str", None, "memory", "the peak that matters here: vram on a GPU, rss on a CPU"),
    F("memory_sampler", "str", None, "memory", "on, or off (--nvml-period-ms 0: no sampling thread; the sampled "
      "peaks are null)"),
    F("sampler_mode", "str", None, "memory", "where the sampler polled from: thread, or process "
      "(--sampler-mode process; if that process cannot start, the thread takes over and nvml_error says why)"),
    F("baseline_vram_bytes", "int", "bytes", "memory", "NVML used before the worker initialised CUDA",
      metric=True, table="VRAM baseline"),
    F("peak_vram_over_baseline_bytes", "int", "bytes", "memory", "peak_vram_bytes - baseline_vram_bytes",
      metric=True, better="lower", bench=True),
    F("device_total_bytes", "int", "bytes", "memory", "the device's total memory (NVML)", metric=True),
    F("nvml_samples", "int", "count", "memory", "NVML readings taken (0 with the sampler off)"),
    F("nvml_period_s", "float", "s", "memory", "sampling period (null when not sampling)"),
    F("nvml_error", "str", None, "memory", "why NVML could not be used, if it could not"),
    F("peak_rss_sampled_bytes", "int", "bytes", "memory", "the sampler's highest resident-memory reading",
      metric=True, better="lower"),
    F("cuda_context_bytes", "int", "bytes", "memory", "device memory held outside PyTorch's allocator right after "
      "CUDA init and one cuBLAS call (NVML used - baseline - torch reserved)", metric=True, better="lower",
      table="CUDA context"),
    F("non_allocator_peak_bytes", "int", "bytes", "memory", "the same figure, highest after any training step "
      "(context plus lazily loaded device code)", metric=True, better="lower", table="outside allocator"),
)

_BUDGET = (
    F("vram_budget_bytes", "int", "bytes", "budget", "the emulated card size (spec.vram_budget_bytes)"),
    F("allocator_limit_initial_bytes", "int", "bytes", "budget", "the allocator cap for the first step"),
    F("allocator_limit_bytes", "int", "bytes", "budget", "the cap at the end, re-set from the measured memory "
      "outside the allocator", metric=True, table="allocator cap"),
    F("budget_fraction", "float", "fraction", "budget", "that cap / the device's total memory (what "
      "torch.cuda.set_per_process_memory_fraction got)"),
    F("nvml_peak_within_budget", "bool", None, "budget", "peak_vram_bytes <= vram_budget_bytes"),
    F("budget_exceeded_outside_allocator", "bool", None, "budget", "the cell ran but NVML went over the budget "
      "(the status is then oom)"),
)

FIELDS = (*_ALWAYS, *_RUN, *_TRUST, *_SPEED, *_MEMORY, *_BUDGET)
