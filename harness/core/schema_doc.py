"""docs/results-schema.md, generated from the schema (``python -m harness.core.schema_doc``).

Pure module. The per-field rows come from ``harness.core.schema``; the prose here says
what no single field can: what a record is, units and nulls, the cell id, the statuses,
what the phase timers cover, the budget's semantics, how torchrun cells merge their ranks.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from harness.core import schema

PREAMBLE = """\
One JSON object per line of a run folder's `results.jsonl`, one line per cell, appended
(and fsynced) the moment the cell ends; a resumed or retried cell adds another line, and
readers take a cell's last one. The record holds the cell's whole spec, what the worker
measured, and the runner's bookkeeping.

- Units: the unit column says what a number counts. Bytes, seconds (`s`; `s/step` for a
  step's time), joules (`J`), tokens per second; a `fraction` is 0..1 (reports show it as
  a percentage). Most names also end in their unit (`_bytes`, `_s`, `_j`).
- `null` means "not measured": VRAM on a CPU host, MFU where the device's peak is unknown,
  anything a failed cell never reached. Fields marked "every record" are present (maybe
  null) on every line; the others appear when they apply.
- Non-finite floats (a diverged loss) are written as the strings `"nan"`, `"inf"`,
  `"-inf"`, so every line is valid JSON; readers turn them back into numbers.
- Versions: `schema_version` is the version a record was written in; the since column says
  which version introduced a field. Readers upgrade older records
  (`harness.core.schema.upgrade`): a field newer than the record gets its declared
  default, as does a missing "every record" field, and the stored `spec` is re-read so
  settings added later (`spec.lora.input_cast`, `spec.window`, `spec.world_size`) get
  today's defaults. Records without a version (from before versions were written) read as
  version 1. A record of a newer version than the harness reading it is kept as it is and
  flagged with a warning naming the file and the version.

This file is generated: edit `harness/core/schema_fields.py` / `schema_fields_more.py`
(the fields) or `harness/core/schema_doc.py` (this prose), then run
`python -m harness.core.schema_doc > docs/results-schema.md`.
"""

CELL_IDS = """\
`cell_id` is stable across runs and hosts (so runs compare and resume):
`model/precision/s<seq_len>/gc-<mode>[/b<batch>][/load-<path>][/vram<budget>][/img<n>][/px<size>][/lora-vision][/lora-nocast][/ws<N>-<ddp|fsdp>][/<tag>]`.
The budget reads like `24GiB`; image settings appear only when not the model's default;
`ws<N>-...` only for torchrun cells (world size > 1). Settings that are constant over a
sweep (LoRA rank, steps, optimizer, the adaptive window) are not in the id.
"""

STATUSES = (
    ("ok", "ran every step and every proof held"),
    ("oom", "ran out of memory: a measurement, not a bug (also a pruned cell, see `pruned`)"),
    ("unsupported", "cannot run on this host, with the reason in `error`"),
    ("error", "raised, or a precision / checkpointing / LoRA-sync proof failed"),
    ("crash", "the worker died: a signal, or an exit without a result"),
    ("timeout", "killed after the cell's time limit"),
)

GROUP_TITLES = {
    "identity": "Identity", "axes": "Axes", "outcome": "Outcome", "speed": "Speed", "compute": "Compute (FLOPs, MFU)",
    "energy": "Energy", "memory": "Memory", "budget": "VRAM budget", "phases": "Phase timers",
    "load": "Loading", "precision": "Precision", "loss": "Loss", "proofs": "Proofs (layers, checkpointing)",
    "inputs": "Inputs", "vlm": "Vision-language cells", "host": "Host and device", "gpu-pool": "GPU pool (`--gpus`)",
    "ray": "Ray cluster (`--ray`)",
    "dist": "Multi-GPU cells (torchrun)", "stack": "Training stack, torch.compile, attention kernel",
}

GROUP_INTROS = {
    "axes": "The matrix axes, copied from the spec onto every record.",
    "stack": """\
What trained: the stack (`hf`: transformers + peft; `liger`: Liger kernels applied to the
loaded model before LoRA; `unsloth`: Unsloth's FastLanguageModel loader and get_peft_model),
with its package versions and the checks that it was in effect (`stack_proof`; for every
stack the layer census in `loaded_layers` says whether 4-bit, 8-bit or 16-bit layers were
loaded); the attention implementation the layers use; torch.compile's cost and counters.""",
    "outcome": """\
A compat cell the capability rules predict unsupported is still attempted
(`prediction.supported` false, `status` what really happened); a matrix cell is then
recorded `unsupported` with `predicted_unsupported: true` and never started. With pruning
on, a cell longer than one of the same row that ran out of memory is recorded `oom` with
`pruned: true` without running.""",
    "speed": """\
Throughput comes from the measured steps' own timer only: never warm-up, model build or
teardown. The measured window is `spec.steps` steps, or with `spec.window` (the adaptive
window, `--adaptive-steps`) it stops once the median step time is stable, at a time cap, or
at its maximum (the rule: `harness/core/window.py`).""",
    "compute": "MFU = tokens/s x FLOPs per token / the device's dense datasheet peak.",
    "memory": """\
The sampler polls NVML and the worker's RSS while the cell runs. Off (`--nvml-period-ms 0`),
no sampling ran: `peak_vram_bytes`, `peak_vram_over_baseline_bytes` and
`peak_rss_sampled_bytes` are null, `nvml_samples` is 0; the baseline, the energy counter,
the allocator's peaks and `peak_rss_bytes` are still measured. Every CUDA cell records
`cuda_context_bytes` and `non_allocator_peak_bytes`.""",
    "budget": """\
A cell with `spec.vram_budget_bytes` emulates a smaller card: the allocator is capped so
that allocator + the memory outside it fits the budget (the cap is set before the first
step, then re-set from the measured outside memory), and after the cell NVML's peak must
be within the budget too; a cell that ran but went over it outside the allocator is
recorded `oom`. A cell that first wrote the synthetic checkpoint it loads sets
`checkpoint_written_before_cell` (its baseline then includes the CUDA context).""",
    "phases": """\
A cell's wall time is cut into consecutive phases on one clock (`time.monotonic`, the same
system-wide clock in the parent and the worker), in this order: spawn, imports,
checkpoint_write, device_init, model_load, lora_wrap, data_prep, warmup, measured, verify,
teardown; so they add up to `wall_time_s` (`phase_unaccounted_s` is the rest, ~0). They are
on every record whose worker returned a result; a failing cell's phase in progress gets the
time up to the failure and later phases 0; `timeout` / `crash` records and cells never
started have none. `step_times_s` lie inside `phase_measured_s`, `warmup_step_times_s`
inside `phase_warmup_s`; their difference is the harness's per-step bookkeeping.""",
    "proofs": """\
`loaded_layers` example (nf4, an 8B model):

```json
{"linear4bit": {"count": 224, "quant_types": {"nf4": 224}, "double_quant": 0,
                "compute_dtypes": {"bfloat16": 224}},
 "linear8bit": {"count": 0}, "linear": {"count": 1, "dtypes": {"bfloat16": 1}},
 "unexpected_plain": [], "unexpected_plain_count": 0, "kept_unquantized": {"lm_head": 1},
 "lora_layers": 224, "lora_adapter_dtypes": {"float32": 448}}
```

Checkpointing rules: `off` needs zero recomputations and nothing offloaded; `on` needs
`layer_recomputes == layer_runs_forward` and nothing offloaded; `offload` needs both
equalities with `offloaded_tensors`. Every LoRA parameter must receive a gradient.""",
    "vlm": "`frozen_matmul_params` / `lora_matmul_params` are then the language model's only.",
    "gpu-pool": """\
Pruned and predicted-unsupported records of a `--gpus` run never started: they carry
`gpu_pool` but no `gpu_index`. An invocation made with `--gpus` adds `throughput` to
run.json (cells run, their wall time, cells per hour, the worker servers' start), and
env.json gets `gpu_pool` (per GPU: index, UUID, name, worker mode, preload time).""",
    "ray": """\
A `--ray` record of a cell that ran also carries the GPU fields above (`gpu_index`,
`gpu_uuid`, `gpu_pin_mismatch`; no `gpu_pool`), for the GPU of its node, and `hostname` is
its node's. Cells recorded without running (pruned, predicted unsupported, replayed) have
none of them. A worker lost under a cell does not make a record: the cell runs again, and
after three losses it is recorded as `crash` with the reasons. The invocation's
`throughput` in run.json names the workers (`node:gpuN`), the cluster (`ray`, `nodes`,
`gpus`) and how many runs were lost (`requeued`); env.json is the first worker's node's,
with `workers` listing every worker (node, IP, GPU, fork server mode).""",
    "dist": """\
A cell with `spec.world_size` N > 1 runs as N torchrun ranks; each writes the fields above
for its own process and the record merges them. Other worker fields (`loaded_layers`,
`device_name`, `load_time_s`, ...) are the lowest reporting rank's. Per step, the step time
is the slowest rank's (ranks start each step together), and `tokens_per_s` is the cell's
total, N x batch x seq_len / `step_time_s`; MFU uses per-GPU tokens/s. `losses` is the
mean over ranks of each step's loss; `energy_j` is summed over the ranks' GPUs. The memory
peaks (`peak_vram_bytes`, `torch_peak_*`, `peak_rss_bytes`, ...) hold the largest value over
ranks, so they read as for one GPU. A failed cell is named by one rank: an OOM on any
rank first, then a rank's own error, then unsupported; a rank that died without a record
makes the cell `crash` (peers that only saw it go away mid-collective do not count). FSDP
cells have `load_path: "config-meta"`, and their `saved_activation_bytes_step0` also counts
the all-gathered weights autograd keeps. The cell's log holds every rank's lines.""",
}

OTHER_FILES = """\
- `env.json`: the host fingerprint (hostname, platform, Python, package versions, CUDA and
  driver, devices, NVML, bf16 support, bitsandbytes backend, attention kernels), the
  worker server's mode and start time (`worker_start_s`, `env_collect_s`).
- `run.json`: `{"run_id", "invocations": [{"command", "started", "options", "matrix", "cells"}]}`.
- `logs/<cell>.log`, `logs/forkserver.log`, `logs/env.log` (a `--gpus` run's servers log
  to `logs/gpu<index>/forkserver.log`).
- `fit.json`, `fit.md`, `fit.png` (the fit search) and `claims.json`, `claims.md`, when
  those ran; `compat.md` / `compat.json`, `stability.md` / `stability.json`,
  `loading.json` and `logs/loading.log` when those suites ran (`lora-harness tables
  RUN_DIR` rebuilds the tables from `results.jsonl`).
"""


def _notes(f: schema.Field) -> str:
    notes = []
    if f.always:
        notes.append("every record")
    if f.metric:
        notes.append(f"metric ({f.better} is better)" if f.better else "metric")
    if f.step_band:
        notes.append("per-step noise band")
    if f.per:
        notes.append(f"one entry per {f.per}")
    if f.bench:
        notes.append("benchmark extra_info")
    if f.table:
        notes.append(f"report column '{f.table}'")
    if f.default is not None:
        notes.append(f"default {json.dumps(f.default)}")
    return "; ".join(notes)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def group_section(group: str) -> list[str]:
    rows = [f for f in schema.fields() if f.group == group]
    if not rows:
        return []
    out = [f"## {GROUP_TITLES.get(group, group)}", ""]
    if group in GROUP_INTROS:
        out += [GROUP_INTROS[group], ""]
    out += ["| field | type | unit | since | meaning | notes |", "|---|---|---|---|---|---|"]
    out += [f"| `{f.name}` | {f.type} | {f.unit or ''} | {f.since} | {_cell(f.doc)} | {_notes(f)} |" for f in rows]
    return out + [""]


def _spec_rows(cls: Any, prefix: str = "") -> list[str]:
    rows = []
    for fld in dataclasses.fields(cls):
        name = prefix + fld.name
        if fld.name in ("lora", "window"):
            from harness.core.spec import LoraSpec, WindowSpec

            sub = LoraSpec if fld.name == "lora" else WindowSpec
            rows.append(f"| `{name}` | {'(object)' if fld.name == 'lora' else 'null (a fixed window), or an object'} |")
            rows += _spec_rows(sub, name + ".")
            continue
        if fld.default is not dataclasses.MISSING:
            default = json.dumps(fld.default)
        else:
            default = "required"
        rows.append(f"| `{name}` | {default} |")
    return rows


def spec_section() -> list[str]:
    from harness.core.spec import CellSpec

    return ["## `spec`", "",
            "The cell's `CellSpec` (`harness/core/spec.py` says what each setting means), with today's defaults "
            "for settings a record was written without:", "",
            "| key | default |", "|---|---|", *_spec_rows(CellSpec), ""]


def markdown() -> str:
    head = [f"# Results schema (`results.jsonl`, schema_version {schema.SCHEMA_VERSION})", "", PREAMBLE,
            "## Cell ids", "", CELL_IDS, "## Statuses", "", "| status | meaning |", "|---|---|",
            *[f"| `{s}` | {m} |" for s, m in STATUSES], ""]
    body = [line for g in schema.GROUPS for line in group_section(g)]
    return "\n".join(head + body + spec_section() + ["## Other files of a run folder", "", OTHER_FILES])


if __name__ == "__main__":
    print(markdown(), end="")
