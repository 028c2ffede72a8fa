"""Tables of the harness's own performance (overhead, repeatability, sweep cost). Pure: records in, rows and markdown
out (no torch; reading a run folder is the only I/O, in ``sweep_cost_of_run``).

- **sweep cost** (``lora-harness sweep-cost RUN_DIR``): per cell its fixed cost (wall time
  minus warm-up and measured steps) and where it went; totals for the run (fixed cost,
  warm-up, measured time, the sweep's wall time, the worker server's start). Records from
  before the phase timers (the committed H200 reference runs) have wall time and the
  timed steps only: their fixed cost is marked ``approx``.
- **repeatability** (``benchmarks/repeatability.py``): per cell repeated K times, the
  spread (max - min) / median of peak VRAM (NVML), the torch allocator's peaks, and
  tokens/s, against the targets (1% memory, 3% speed).
- **overhead** (``benchmarks/overhead.py``): the bare loop vs the harness vs the harness
  without the NVML sampler, against the targets (3% speed, 1% memory, 1% sampler cost).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

from harness.core.axes import is_quantised
from harness.core.phases import PHASES, fixed_cost, phase_field, spread, warmup_and_measured
from harness.core.fmt import fmt_gib, markdown_table

# the targets of the harness's own performance (benchmarks/README.md)
TARGET_OVERHEAD_SPEED = 0.03  # harness tokens/s within 3% of the bare loop's
TARGET_OVERHEAD_MEMORY = 0.01  # harness torch peak allocated within 1% of the bare loop's
TARGET_SAMPLER = 0.01  # the NVML sampler costs under 1% of throughput
TARGET_REPEAT_MEMORY = 0.01  # spread of peak VRAM over repeats
TARGET_REPEAT_SPEED = 0.03  # spread of tokens/s over repeats
TARGET_FIXED_16BIT_S = 5.0  # fixed cost of a 16-bit cell with a warm cache
TARGET_FIXED_QUANT_S = 10.0  # ... of a quantised cell


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


# -- sweep cost --------------------------------------------------------------------------

def fixed_cost_target(record: dict[str, Any]) -> float:
    quant = is_quantised(record.get("precision"))
    return TARGET_FIXED_QUANT_S if quant else TARGET_FIXED_16BIT_S


def cell_cost(record: dict[str, Any]) -> dict[str, Any]:
    """One cell's row of the sweep-cost table."""
    fixed, source = fixed_cost(record)
    warm, measured = warmup_and_measured(record)
    row = {"cell_id": record.get("cell_id"), "status": record.get("status"), "wall_s": record.get("wall_time_s"),
           "fixed_cost_s": fixed, "fixed_source": source, "warmup_s": warm, "measured_s": measured,
           "measured_steps": record.get("measured_steps", len(record.get("step_times_s") or [])),
           "window_rule": record.get("window_rule"), "load_time_s": record.get("load_time_s"),
           # a cell that wrote the synthetic checkpoint pays for it once per cache folder
           # (records from before the phase timers only show it as a long checkpoint_prepare_s)
           "checkpoint_written": bool(record.get("checkpoint_written_before_cell")
                                      or record.get("checkpoint_written_in_cell"))
           or (record.get("checkpoint_prepare_s") or 0) > 1.0,
           "fixed_cost_target_s": fixed_cost_target(record),
           "pruned_or_predicted": bool(record.get("pruned") or record.get("predicted_unsupported"))}
    for p in PHASES:
        row[p] = record.get(phase_field(p))
    row["fixed_within_target"] = None if fixed is None or row["checkpoint_written"] else fixed < row["fixed_cost_target_s"]
    return row


def invocation_spans(run_json: dict[str, Any] | None, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each invocation's wall time: from its start (run.json) to the last record stored
    before the next invocation started (record timestamps have 1 s resolution)."""
    invs = (run_json or {}).get("invocations") or []
    starts = [_ts(i.get("started")) for i in invs]
    out = []
    for k, inv in enumerate(invs):
        s = starts[k]
        nxt = starts[k + 1] if k + 1 < len(starts) else None
        mine = [t for t in (_ts(r.get("timestamp")) for r in records)
                if t is not None and s is not None and t >= s and (nxt is None or t < nxt)]
        out.append({"started": inv.get("started"), "command": inv.get("command"), "cells_recorded": len(mine),
                    "wall_s": (max(mine) - s) if mine else None})
    return out


def sweep_cost(records: list[dict[str, Any]], env: dict[str, Any] | None = None,
               run_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-cell fixed costs and the run's totals."""
    rows = [cell_cost(r) for r in records]
    ran = [r for r in rows if r["wall_s"]]
    spans = invocation_spans(run_json, records)
    total = lambda key: sum(float(r[key] or 0.0) for r in ran)  # noqa: E731
    fixed_known = [r for r in ran if r["fixed_cost_s"] is not None]
    sources = sorted({r["fixed_source"] for r in fixed_known})
    sweep_wall = sum(s["wall_s"] for s in spans if s["wall_s"] is not None) if spans else None
    env = env or {}
    totals = {
        "cells": len(rows), "cells_run": len(ran), "cells_wall_s": total("wall_s"),
        "fixed_cost_s": sum(r["fixed_cost_s"] for r in fixed_known), "warmup_s": total("warmup_s"),
        "measured_s": total("measured_s"), "fixed_cost_source": "+".join(sources) or None,
        "sweep_wall_s": sweep_wall, "invocations": spans,
        "worker_preload_s": env.get("worker_preload_s"), "worker_start_s": env.get("worker_start_s"),
        "env_collect_s": env.get("env_collect_s"), "worker_mode": env.get("worker_mode"),
        "fixed_cost_median_by_precision": {},
    }
    if sweep_wall is not None:
        # timestamps have 1 s resolution: a sweep with nothing between its cells can read -0.x
        totals["outside_cells_s"] = max(0.0, sweep_wall - totals["cells_wall_s"])
        if env.get("worker_start_s") is not None:  # run.json's start is written once the server is up
            totals["sweep_wall_with_server_s"] = sweep_wall + float(env["worker_start_s"]) \
                + float(env.get("env_collect_s") or 0.0)
    by_prec: dict[str, list[float]] = {}
    for rec, row in zip(records, rows):
        if row["fixed_cost_s"] is not None and not row["checkpoint_written"] and rec.get("status") == "ok":
            by_prec.setdefault(str(rec.get("precision")), []).append(row["fixed_cost_s"])
    totals["fixed_cost_median_by_precision"] = {k: statistics.median(v) for k, v in sorted(by_prec.items())}
    return {"cells": rows, "totals": totals}


def sweep_cost_of_run(run_dir: str | Path) -> dict[str, Any]:
    from harness.core.store import read_records

    d = Path(run_dir)
    read = lambda name: json.loads((d / name).read_text()) if (d / name).is_file() else None  # noqa: E731
    env = read("env.json") or {}
    if env.get("worker_start_s") is None and (d / "console.log").is_file():
        # runs from before the phase timers printed the server's start only
        m = re.search(r"worker server ready in ([0-9.]+) s", (d / "console.log").read_text(errors="replace"))
        if m:
            env = dict(env, worker_start_s=float(m.group(1)), worker_start_from="console.log")
    out = sweep_cost(read_records(d / "results.jsonl")[0], env, read("run.json"))
    out["run_dir"] = str(d)
    return out


def sweep_cost_markdown(cost: dict[str, Any]) -> str:
    t = cost["totals"]
    phase_cols = [p for p in PHASES if p not in ("warmup", "measured")]
    show = [p for p in phase_cols if any(r.get(p) is not None for r in cost["cells"])]
    headers = ["cell", "status", "wall", "fixed cost", "warm-up", "measured (steps, rule)"] + \
              [p.replace("_", " ") for p in show]
    rows = []
    for r in cost["cells"]:
        if not r["wall_s"]:
            continue
        fixed = _f(r["fixed_cost_s"]) + (" ~" if r["fixed_source"] == "approx" else "") + \
            (" (ckpt written)" if r["checkpoint_written"] else "")
        rule = f"{_f(r['measured_s'])} ({r['measured_steps']}{', ' + r['window_rule'] if r['window_rule'] else ''})"
        rows.append([r["cell_id"], r["status"], _f(r["wall_s"]), fixed, _f(r["warmup_s"]), rule]
                    + [_f(r.get(p), "{:.2f}") for p in show])
    lines = [f"# Sweep cost: {cost.get('run_dir', '')}", "",
             "Seconds. fixed cost = wall - warm-up - measured steps"
             + (" (`~`: a record without phase timers: wall minus the timed steps)" if "approx" in
                (t["fixed_cost_source"] or "") else "") + ".", "", markdown_table(headers, rows), "",
             "| total | seconds |", "|---|---:|",
             f"| cells run | {t['cells_run']} of {t['cells']} |",
             f"| cells' wall time | {_f(t['cells_wall_s'])} |",
             f"| fixed cost | {_f(t['fixed_cost_s'])} ({t['fixed_cost_source'] or '-'}) |",
             f"| warm-up steps | {_f(t['warmup_s'])} |",
             f"| measured steps | {_f(t['measured_s'])} |",
             f"| sweep wall time, invocation start (server up) to the last record | {_f(t['sweep_wall_s'])} |",
             f"| ... of which between cells (records, progress, pytest) | {_f(t.get('outside_cells_s'))} |",
             f"| worker server: library preload | {_f(t['worker_preload_s'])} |",
             f"| worker server: start (preload included) | {_f(t['worker_start_s'])} |",
             f"| host fingerprint (env.json) | {_f(t.get('env_collect_s'))} |",
             f"| sweep wall time with the server's start | {_f(t.get('sweep_wall_with_server_s'))} |"]
    med = t["fixed_cost_median_by_precision"]
    if med:
        lines += ["", "Median fixed cost of `ok` cells (cells that wrote a checkpoint left out): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in med.items())
                  + f" (targets: < {TARGET_FIXED_16BIT_S:g} s 16-bit, < {TARGET_FIXED_QUANT_S:g} s quantised)."]
    return "\n".join(lines) + "\n"


# -- repeatability -----------------------------------------------------------------------

REPEAT_METRICS = (("peak_vram_bytes", "NVML peak", TARGET_REPEAT_MEMORY),
                  ("torch_peak_allocated_bytes", "torch peak allocated", TARGET_REPEAT_MEMORY),
                  ("torch_peak_reserved_bytes", "torch peak reserved", TARGET_REPEAT_MEMORY),
                  ("tokens_per_s", "tokens/s", TARGET_REPEAT_SPEED),
                  ("peak_rss_bytes", "peak RSS", None))  # host memory: shown, not judged


def base_cell_id(record: dict[str, Any]) -> str:
    """The cell id without its repetition number: ``.../r2`` -> ``...``, ``.../r2-nvml-off``
    -> ``.../nvml-off`` (repeats of one condition group together, conditions apart)."""
    cid = str(record.get("cell_id"))
    tag = (record.get("spec") or {}).get("tag") or ""
    m = re.fullmatch(r"r\d+(?:-(.+))?", tag)
    if not m or not cid.endswith("/" + tag):
        return cid
    return cid[: -len(tag) - 1] + (f"/{m.group(1)}" if m.group(1) else "")


def repeatability(records: Iterable[dict[str, Any]], key=base_cell_id) -> list[dict[str, Any]]:
    """One row per cell: each metric's values over the repeats, spread, pass / fail.

    Memory passes on the NVML peak where it was sampled, else on the torch allocator's
    peak (allocated); where neither exists (a CPU host) memory is ``n/a``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault(key(r), []).append(r)
    rows = []
    for cid, recs in groups.items():
        row: dict[str, Any] = {"cell": cid, "repeats": len(recs)}
        for field, _, _ in REPEAT_METRICS:
            vals = [r.get(field) for r in recs]
            row[field] = vals
            row[field + "_spread"] = spread(vals) if all(v is not None for v in vals) else None
        row["step_time_spread_within_median"] = _median(r.get("step_time_spread") for r in recs)
        mem_field = "peak_vram_bytes" if row["peak_vram_bytes_spread"] is not None else "torch_peak_allocated_bytes"
        mem = row[mem_field + "_spread"]
        row["memory_judged_on"] = mem_field if mem is not None else None
        row["memory_pass"] = None if mem is None else mem < TARGET_REPEAT_MEMORY
        tps = row["tokens_per_s_spread"]
        row["speed_pass"] = None if tps is None else tps < TARGET_REPEAT_SPEED
        rows.append(row)
    return rows


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def repeatability_markdown(rows: list[dict[str, Any]], *, title: str = "Repeatability", note: str = "") -> str:
    headers = ["cell", "repeats", "NVML peak spread", "torch allocated spread", "torch reserved spread",
               "peak RSS spread", "tokens/s spread", "tokens/s values", "within-cell step spread (median)",
               f"memory < {TARGET_REPEAT_MEMORY:.0%}", f"tokens/s < {TARGET_REPEAT_SPEED:.0%}"]
    body = []
    for r in rows:
        vals = ", ".join(f"{v:,.0f}" if v and v >= 100 else _f(v) for v in r["tokens_per_s"])
        within = r["step_time_spread_within_median"]
        body.append([r["cell"], r["repeats"], _pct(r["peak_vram_bytes_spread"]),
                     _pct(r["torch_peak_allocated_bytes_spread"]), _pct(r["torch_peak_reserved_bytes_spread"]),
                     _pct(r["peak_rss_bytes_spread"]), _pct(r["tokens_per_s_spread"]), vals, _pct(within),
                     _verdict(r["memory_pass"]) + (" (torch)" if r["memory_judged_on"] == "torch_peak_allocated_bytes"
                                                   else ""), _verdict(r["speed_pass"])])
    text = [f"# {title}", "", "Spread = (max - min) / median over the repeats; each repeat a fresh process. "
            "Memory is judged on NVML's peak where sampled, else the torch allocator's (marked), n/a on a CPU "
            "(no device memory).", ""]
    if note:
        text += [note, ""]
    return "\n".join(text + [markdown_table(headers, body)]) + "\n"


# -- overhead ----------------------------------------------------------------------------

def _median(vals: Iterable[float | None]) -> float | None:
    v = [float(x) for x in vals if x is not None]
    return statistics.median(v) if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def overhead_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs``: one dict per run with ``cell``, ``kind`` (bare / harness / harness-nvml-off),
    ``tokens_per_s``, ``torch_peak_allocated_bytes`` and ``losses``. One row per cell."""
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        cells.setdefault(r["cell"], {}).setdefault(r["kind"], []).append(r)
    rows = []
    for cell, kinds in cells.items():
        get = lambda kind, f: [r.get(f) for r in kinds.get(kind, []) if r.get("status", "ok") == "ok"]  # noqa: E731
        bare_t, har_t, off_t = (_median(get(k, "tokens_per_s")) for k in ("bare", "harness", "harness-nvml-off"))
        bare_m, har_m = (_median(get(k, "torch_peak_allocated_bytes")) for k in ("bare", "harness"))
        speed = _ratio(har_t, bare_t)
        mem = _ratio(har_m, bare_m)
        sampler = _ratio(har_t, off_t)
        proc_t = _median(get("harness-sampler-process", "tokens_per_s"))
        sampler_proc = _ratio(proc_t, off_t)
        loss_diff = None
        bl, hl = get("bare", "losses"), get("harness", "losses")
        if bl and hl and bl[0] and hl[0] and len(bl[0]) == len(hl[0]):
            loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(bl[0], hl[0]))
        rows.append({
            "cell": cell, "runs": {k: len(v) for k, v in kinds.items()},
            "bare_tokens_per_s": bare_t, "harness_tokens_per_s": har_t, "harness_nvml_off_tokens_per_s": off_t,
            "speed_ratio": speed, "speed_pass": None if speed is None else speed >= 1 - TARGET_OVERHEAD_SPEED,
            "bare_torch_peak_allocated_bytes": bare_m, "harness_torch_peak_allocated_bytes": har_m,
            "memory_ratio": mem, "memory_pass": None if mem is None else abs(mem - 1) <= TARGET_OVERHEAD_MEMORY,
            "sampler_ratio": sampler, "sampler_pass": None if sampler is None else sampler >= 1 - TARGET_SAMPLER,
            "harness_sampler_process_tokens_per_s": proc_t, "sampler_process_ratio": sampler_proc,
            "sampler_process_pass": None if sampler_proc is None else sampler_proc >= 1 - TARGET_SAMPLER,
            "tokens_per_s_values": {k: get(k, "tokens_per_s") for k in kinds},
            "loss_max_rel_diff_first_run": loss_diff,
        })
    return rows


def overhead_markdown(rows: list[dict[str, Any]], *, title: str = "Harness overhead", note: str = "") -> str:
    headers = ["cell", "bare tokens/s", "harness tokens/s", "harness / bare",
               f">= {1 - TARGET_OVERHEAD_SPEED:.0%}", "bare torch peak alloc", "harness torch peak alloc",
               "harness / bare", f"within {TARGET_OVERHEAD_MEMORY:.0%}", "harness, sampler off, tokens/s",
               "sampler on / off", f">= {1 - TARGET_SAMPLER:.0%}"]
    proc = any(r.get("sampler_process_ratio") is not None for r in rows)
    if proc:
        headers += ["sampler in a process / off", f">= {1 - TARGET_SAMPLER:.0%}"]
    headers += ["losses: largest relative difference"]
    body = []
    for r in rows:
        rate = lambda x: "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"  # noqa: E731
        ratio = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        mem_na = r["bare_torch_peak_allocated_bytes"] is None and r["harness_torch_peak_allocated_bytes"] is None
        body.append([r["cell"], rate(r["bare_tokens_per_s"]), rate(r["harness_tokens_per_s"]), ratio(r["speed_ratio"]),
                     _verdict(r["speed_pass"]),
                     "n/a" if mem_na else fmt_gib(r["bare_torch_peak_allocated_bytes"]),
                     "n/a" if mem_na else fmt_gib(r["harness_torch_peak_allocated_bytes"]),
                     "n/a" if mem_na else ratio(r["memory_ratio"]), _verdict(r["memory_pass"]),
                     rate(r["harness_nvml_off_tokens_per_s"]), ratio(r["sampler_ratio"]), _verdict(r["sampler_pass"])]
                    + ([ratio(r.get("sampler_process_ratio")), _verdict(r.get("sampler_process_pass"))] if proc else [])
                    + ["-" if r["loss_max_rel_diff_first_run"] is None else f"{r['loss_max_rel_diff_first_run']:.1e}"])
    text = [f"# {title}", "",
            "Medians over the repetitions (order rotated each repetition). tokens/s from each run's median "
            "measured step; torch peak allocated since the training loop started (n/a on a CPU: no allocator "
            "peak). Targets: harness tokens/s within 3% of the bare loop's, torch peak within 1%, the NVML "
            "sampler under 1% of throughput.", ""]
    if note:
        text += [note, ""]
    return "\n".join(text + [markdown_table(headers, body)]) + "\n"
