"""The report's tables, as (headers, rows) of display strings. Pure module.

Every metric a record holds appears in one of them: speed (tokens/s, step times, MFU,
energy), memory (NVML, torch allocator, RSS), training evidence (losses, loaded layers,
checkpointing), and "more metrics": every field the schema gives a report column
(``harness.core.schema``). Units are converted here, through ``harness.report.units``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.core import fmt as fmt_core
from harness.core import schema, steps
from harness.report.units import as_float, fmt

Table = tuple[list[str], list[list[str]]]


def _dims(cells: pd.DataFrame) -> tuple[bool, bool]:
    """Which dimensions get a column: the device when cells ran on several, the training
    stack when they ran on several (it is in the id too; the column makes it plain)."""
    stacks = cells["stack"].fillna("hf").nunique() if "stack" in cells.columns else 1
    return cells["device_label"].nunique() > 1, stacks > 1


def _cell(r: pd.Series, dims: tuple[bool, bool]) -> list[str]:
    stack = r.get("stack") if isinstance(r.get("stack"), str) else "hf"
    return ([str(r["device_label"])] if dims[0] else []) + ([stack] if dims[1] else []) + [str(r["cell_id"])]


def _status(r: pd.Series) -> str:
    st = str(r["status"])
    st = "OOM" if st == "oom" else st
    n = as_float(r.get("attempts"))
    return f"{st} ({int(n)} records)" if n and n > 1 else st


def _heads(dims: tuple[bool, bool], *rest: str) -> list[str]:
    return (["device"] if dims[0] else []) + (["stack"] if dims[1] else []) + ["cell", *rest]


def speed_table(cells: pd.DataFrame) -> Table:
    dev = _dims(cells)
    rows = []
    for _, r in cells.iterrows():
        ok = r["status"] == "ok"
        rows.append(_cell(r, dev) + [_status(r)] + [
            f"{r['tokens_per_s']:,.0f}" if ok and r["tokens_per_s"] == r["tokens_per_s"] else "-",  # unit in the header
            fmt("step_time_s", r["step_time_s"]) if ok else "-",
            fmt("step_time_p90_s", r["step_time_p90_s"]) if ok else "-",
            fmt("step_time_spread", r["step_time_spread"]) if ok else "-",
            str(len(r["step_times_s"])) if isinstance(r["step_times_s"], list) and r["step_times_s"] else "-",
            fmt("mfu", r["mfu"]), fmt("energy_per_token_j", r["energy_per_token_j"]),
            fmt("wall_time_s", r["wall_time_s"]), _quality(r) if ok else "",
        ])
    return _heads(dev, "status", "tokens/s", "step time (median)", "step time (p90)", "step spread",
                  "measured steps", "MFU", "energy / token", "cell wall time", "speed figure"), rows


def _quality(r: pd.Series) -> str:
    """Why this cell's tokens/s is not a figure to compare: its steps disagree, the GPU
    waited on the host, or other work loaded the host (computed for older records)."""
    rec = {k: (None if v is None or (isinstance(v, float) and v != v) else v)
           for k, v in r.items() if k in ("stable", "step_times_s", "host_bound", "host_busy", "repeat")}
    if not isinstance(rec.get("stable"), bool):
        rec.pop("stable", None)
        rec["stable"] = steps.is_stable(rec)
    marks = fmt_core.quality_flags(rec)
    if isinstance(r.get("gpu_busy_fraction"), float) and r["gpu_busy_fraction"] == r["gpu_busy_fraction"]:
        marks = (marks + "; " if marks else "") + f"GPU busy {r['gpu_busy_fraction']:.0%}"
    return marks or "ok"


def memory_table(cells: pd.DataFrame) -> Table:
    dev = _dims(cells)
    rows = []
    for _, r in cells.iterrows():
        rows.append(_cell(r, dev) + [_status(r)] + [
            fmt("peak_vram_bytes", r["peak_vram_bytes"]),
            fmt("peak_vram_over_baseline_bytes", r["peak_vram_over_baseline_bytes"]),
            fmt("torch_peak_allocated_bytes", r["torch_peak_allocated_bytes"]),
            fmt("torch_peak_reserved_bytes", r["torch_peak_reserved_bytes"]),
            fmt("peak_rss_bytes", r["peak_rss_bytes"]),
        ])
    return _heads(dev, "status", "peak VRAM (NVML)", "VRAM over baseline", "torch peak allocated",
                  "torch peak reserved", "peak RSS (host)"), rows


def _layers(v: Any) -> str:
    if not isinstance(v, dict):
        return "-"
    parts = []
    l4 = v.get("linear4bit") or {}
    if l4.get("count"):
        kinds = "/".join(sorted((l4.get("quant_types") or {}).keys())) or "4-bit"
        parts.append(f"{l4['count']} x 4-bit {kinds}" + (" (double quant)" if l4.get("double_quant") else ""))
    l8 = v.get("linear8bit") or {}
    if l8.get("count"):
        parts.append(f"{l8['count']} x 8-bit")
    lin = v.get("linear") or {}
    if lin.get("count"):
        parts.append(f"{lin['count']} x plain ({'/'.join(sorted((lin.get('dtypes') or {}).keys()))})")
    if v.get("lora_layers"):
        parts.append(f"{v['lora_layers']} LoRA")
    return ", ".join(parts) or "-"


def _evidence(v: Any) -> str:
    if not isinstance(v, dict):
        return "-"
    text = f"{v.get('layer_recomputes', '?')} recomputed / {v.get('layer_runs_forward', '?')} layer runs"
    if v.get("offloaded_tensors"):
        text += f", {v['offloaded_tensors']} inputs offloaded ({fmt('offloaded_bytes', v.get('offloaded_bytes'))})"
    held = v.get("ctx_held_activation_bytes_step0")
    if held and v.get("mode") != "off":
        text += f", {fmt('offloaded_bytes', held)} of activations held on autograd contexts (checkpointing cannot free)"
    return text


def training_table(cells: pd.DataFrame) -> Table:
    dev = _dims(cells)
    rows = []
    for _, r in cells.iterrows():
        losses = [x for x in (r["losses"] if isinstance(r["losses"], list) else []) if x is not None]
        loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if len(losses) > 1 else "-"
        bad = as_float(r.get("nonfinite_losses"))
        rows.append(_cell(r, dev) + [_status(r), loss, "-" if bad is None else str(int(bad)),
                                     _layers(r.get("loaded_layers")), _evidence(r.get("grad_ckpt_evidence")),
                                     str(r.get("load_path") or "-")])
    return _heads(dev, "status", "loss first -> last", "non-finite losses", "loaded layers", "checkpointing evidence",
                  "load path"), rows


def more_metrics_table(cells: pd.DataFrame) -> Table:
    """The schema's fields that declare a report column (``Field.table`` in
    harness.core.schema), those that any cell measured: a field declared there shows here
    with no code of its own. No columns: no rows."""
    fields = [f for f in schema.table_fields()
              if f.name in cells.columns and cells[f.name].map(as_float).notna().any()]
    if not fields:
        return [], []
    dev = _dims(cells)
    rows = [_cell(r, dev) + [_status(r)] + [fmt(f.name, r.get(f.name)) for f in fields] for _, r in cells.iterrows()]
    return _heads(dev, "status", *(f.table for f in fields)), rows


def problems_table(cells: pd.DataFrame) -> Table:
    """Cells that are not ok, with the first line of why."""
    dev = _dims(cells)
    rows = []
    for _, r in cells[cells["status"] != "ok"].iterrows():
        err = str(r["error"] or "no detail").splitlines()[0]
        phase = r.get("oom_phase") if r["status"] == "oom" else r.get("phase")
        rows.append(_cell(r, dev) + [_status(r), str(phase) if isinstance(phase, str) else "-",
                                     err if len(err) <= 220 else err[:217] + "..."])
    return _heads(dev, "status", "phase", "reason"), rows


def status_counts(cells: pd.DataFrame) -> str:
    counts = cells["status"].value_counts()
    return ", ".join(f"{n} {'OOM' if s == 'oom' else s}" for s, n in counts.items())


def env_table(env: dict[str, Any]) -> Table:
    """The host fingerprint from env.json, one fact per row."""
    rows: list[list[str]] = []

    def add(k: str, v: Any) -> None:
        if v not in (None, "", [], {}):
            rows.append([k, str(v)])

    add("host", f"{env.get('hostname', '?')} ({env.get('platform', '?')})")
    add("python", env.get("python"))
    add("CPU cores / RAM", f"{env.get('cpu_count', '?')} / {fmt('ram_total_bytes', env.get('ram_total_bytes'))}")
    for d in env.get("devices") or []:
        add(f"cuda:{d.get('index')}", f"{d.get('name')}, compute capability {d.get('compute_capability')}, "
                                      f"{fmt('memory_total_bytes', d.get('memory_total_bytes'))}")
    if not env.get("devices"):
        add("device", "CPU only (no CUDA device)")
    add("driver / CUDA", f"{env.get('driver_version') or '-'} / {env.get('torch_cuda_version') or '-'}")
    add("NVML", "available" if env.get("nvml_available") else f"unavailable ({env.get('nvml_error')})")
    add("bf16 supported", env.get("bf16_supported"))
    bnb = env.get("bitsandbytes") or {}
    add("bitsandbytes", f"{bnb.get('version') or '-'}, backend {bnb.get('backend') or 'none'}")
    for k, v in sorted((env.get("packages") or {}).items()):
        if k != "bitsandbytes":  # shown above with its backend
            add(k, v)
    for k, v in sorted((env.get("attention") or {}).items()):
        add(f"attention: {k}", v)
    add("worker mode", f"{env.get('worker_mode')} ({env.get('worker_mode_reason')})" if env.get("worker_mode") else None)
    if env.get("error"):
        add("env.json", f"incomplete: {env['error']}")
    return ["fact", "value"], rows


def settings_line(cells: pd.DataFrame) -> str:
    """The settings shared by the cells (LoRA, optimizer, steps), from their specs."""
    specs = [s for s in cells.get("spec", pd.Series(dtype=object)) if isinstance(s, dict)]
    if not specs:
        return "settings not recorded"

    def values(get) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(get(s) for s in specs))

    return (f"LoRA rank {values(lambda s: (s.get('lora') or {}).get('rank'))}, "
            f"alpha {values(lambda s: (s.get('lora') or {}).get('alpha'))}, "
            f"targets {values(lambda s: (s.get('lora') or {}).get('target_modules'))}; "
            f"optimizer {values(lambda s: s.get('optimizer'))}, lr {values(lambda s: s.get('lr'))}; "
            f"{values(lambda s: s.get('warmup_steps'))} warm-up + {values(lambda s: s.get('steps'))} measured steps; "
            f"seed {values(lambda s: s.get('seed'))}")
