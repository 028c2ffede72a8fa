"""The compatibility table: for each cell, what the rules predicted and what really
happened, and whether the checkpointing evidence of each mode holds up. Pure module (no
torch); ``write`` puts ``compat.md`` and ``compat.json`` into a run folder.

Outcomes: ``supported`` (every step ran and both proofs held), ``oom`` (supported, but
this size did not fit), ``unsupported`` (the worker's own check said the host cannot run
it, with the reason), ``broken`` (it was attempted and failed: an error, a failed proof,
a crash or a timeout), ``not run`` (predicted unsupported and not attempted; the
compatibility suite always attempts). A prediction *agrees* when "supported" meets
supported / oom, or "unsupported" meets unsupported / broken; anything else is a
disagreement, the interesting finding of a compatibility run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from harness.core.record import Outcome, outcome_for
from harness.core.fmt import fmt_gib, markdown_table

OUTCOMES = ("supported", "oom", "unsupported", "broken", "not run")


@dataclass(frozen=True)
class CompatRow:
    cell_id: str
    model: str
    precision: str
    grad_ckpt: str
    load: str
    device: str | None
    predicted: str  # "supported" / "unsupported"
    prediction_rule: str | None
    prediction_reason: str | None
    outcome: str
    detail: str | None  # the reason or error, first line
    agrees: bool
    layers: str
    layer_runs_forward: int | None
    layer_recomputes: int | None
    offloaded_bytes: int | None
    saved_activation_bytes_step0: int | None
    ctx_held_bytes_step0: int | None
    peak_memory_bytes: int | None
    memory_metric: str | None
    torch_peak_allocated_bytes: int | None
    step_time_s: float | None


def outcome_of(rec: dict[str, Any]) -> str:
    st = rec.get("status")
    if st == "ok":
        return "supported"
    if st == "oom":
        return "oom"
    if st == "unsupported":
        return "not run" if rec.get("predicted_unsupported") else "unsupported"
    return "broken"


def agrees(predicted_supported: bool, outcome: str) -> bool:
    if predicted_supported:
        return outcome in ("supported", "oom")
    return outcome in ("unsupported", "broken", "not run")


def layers_summary(ll: dict[str, Any] | None) -> str:
    """'14 Linear4bit (nf4, double-quant 14/14, compute bfloat16) + 1 Linear bfloat16, 14 LoRA'."""
    if not ll:
        return "-"
    parts = []
    l4 = ll.get("linear4bit") or {}
    if l4.get("count"):
        qt = ",".join(l4.get("quant_types") or {}) or "?"
        cd = ",".join(l4.get("compute_dtypes") or {}) or "?"
        parts.append(f"{l4['count']} Linear4bit ({qt}, double-quant {l4.get('double_quant', 0)}/{l4['count']}, "
                     f"compute {cd})")
    if (ll.get("linear8bit") or {}).get("count"):
        parts.append(f"{ll['linear8bit']['count']} Linear8bitLt")
    lin = ll.get("linear") or {}
    if lin.get("count"):
        parts.append(f"{lin['count']} Linear " + ",".join(lin.get("dtypes") or {}))
    return " + ".join(parts) + f", {ll.get('lora_layers', 0)} LoRA"


def row_for(rec: dict[str, Any]) -> CompatRow:
    pred = rec.get("prediction") or {"supported": not rec.get("predicted_unsupported"), "rule": None,
                                     "reason": rec.get("error") if rec.get("predicted_unsupported") else None}
    outcome = outcome_of(rec)
    spec = rec.get("spec") or {}
    ev = rec.get("grad_ckpt_evidence") or {}
    load = rec.get("load_path") or ("pretrained" if spec.get("load") == "pretrained" else spec.get("load") or "?")
    peak = rec.get("peak_vram_bytes") if rec.get("peak_vram_bytes") is not None else rec.get("peak_rss_bytes")
    err = rec.get("error")
    return CompatRow(
        cell_id=rec.get("cell_id", "?"), model=rec.get("model") or "?", precision=rec.get("precision") or "?",
        grad_ckpt=rec.get("grad_ckpt") or "?", load=load, device=rec.get("device"),
        predicted="supported" if pred.get("supported") else "unsupported", prediction_rule=pred.get("rule"),
        prediction_reason=pred.get("reason"), outcome=outcome,
        detail=str(err).splitlines()[0][:300] if err and outcome != "supported" else None,
        agrees=agrees(bool(pred.get("supported")), outcome), layers=layers_summary(rec.get("loaded_layers")),
        layer_runs_forward=ev.get("layer_runs_forward"), layer_recomputes=ev.get("layer_recomputes"),
        offloaded_bytes=ev.get("offloaded_bytes"), saved_activation_bytes_step0=ev.get("saved_activation_bytes_step0"),
        ctx_held_bytes_step0=ev.get("ctx_held_activation_bytes_step0"),
        peak_memory_bytes=peak, memory_metric="VRAM" if rec.get("peak_vram_bytes") is not None else "RSS",
        torch_peak_allocated_bytes=rec.get("torch_peak_allocated_bytes"), step_time_s=rec.get("step_time_s"),
    )


def compat_outcome(rec: dict[str, Any], *, fail_on_oom: bool = False) -> Outcome:
    """A compat cell's test outcome. Builds on ``result.outcome_for`` (so a cell that did
    not run never passes) and adds: a prediction the attempt contradicts fails, and a cell
    predicted unsupported that indeed did not train is skipped with both reasons."""
    row = row_for(rec)
    if not row.agrees:
        return Outcome("fail", "prediction contradicted: " + disagreement_text(row))
    if row.predicted == "unsupported":
        tried = "not attempted" if row.outcome == "not run" else f"attempted: {row.outcome}: {row.detail}"
        return Outcome("skip", f"unsupported on this host, as predicted ({row.prediction_reason}); {tried}")
    return outcome_for(rec, fail_on_oom=fail_on_oom)


def disagreement_text(row: CompatRow) -> str:
    if row.predicted == "supported":
        return f"{row.cell_id}: predicted supported, but {row.outcome}: {row.detail or 'no detail'}"
    return (f"{row.cell_id}: predicted unsupported by rule {row.prediction_rule} ({row.prediction_reason}), "
            f"but it {'trained' if row.outcome == 'supported' else 'ran out of memory'}")


# -- checkpointing evidence across the three modes ---------------------------------------

def checkpointing_problems(rows_by_mode: dict[str, CompatRow]) -> list[str]:
    """Problems with the evidence of one model x precision x load path across off / on /
    offload. Each cell's own proof (recomputes, offloads) already ran in the worker; this
    adds what only a comparison shows: checkpointing must shrink the activations autograd
    keeps on the device, and only the offload mode moves bytes to host memory."""
    problems = []
    missing = [m for m in ("off", "on", "offload") if m not in rows_by_mode]
    if missing:
        return [f"mode(s) {', '.join(missing)} not run"]
    bad = [f"{m}: {r.outcome}" for m, r in rows_by_mode.items() if r.outcome != "supported"]
    if bad:
        return [f"not every mode trained ({'; '.join(bad)})"]
    off, on, offl = rows_by_mode["off"], rows_by_mode["on"], rows_by_mode["offload"]
    for r in (off, on, offl):
        want = 0 if r.grad_ckpt == "off" else r.layer_runs_forward
        if r.layer_recomputes != want:
            problems.append(f"gc-{r.grad_ckpt}: {r.layer_recomputes} recomputed layer runs, expected {want}")
    if off.offloaded_bytes or on.offloaded_bytes:
        problems.append("bytes offloaded to host memory outside the offload mode")
    if not offl.offloaded_bytes:
        problems.append("the offload mode moved nothing to host memory")
    s_off, s_on, s_offl = off.saved_activation_bytes_step0, on.saved_activation_bytes_step0, \
        offl.saved_activation_bytes_step0
    if None in (s_off, s_on, s_offl):
        problems.append("saved-activation probe missing")
    else:
        if not s_on < s_off:
            problems.append(f"gc-on keeps {s_on} activation bytes on the device, not fewer than gc-off's {s_off}")
        if not s_offl < s_off:
            problems.append(f"gc-offload keeps {s_offl} activation bytes on the device, not fewer than gc-off's {s_off}")
    return problems


def held_findings(rows: Iterable[CompatRow]) -> list[str]:
    """Cells with checkpointing on whose activations sit on custom autograd contexts
    (bitsandbytes' int8 matmul keeps its input as ``ctx`` attributes), which no
    saved-tensor-hook checkpointing can free."""
    out = []
    for r in rows:
        if r.grad_ckpt != "off" and r.ctx_held_bytes_step0:
            out.append(f"{r.cell_id}: {_mb(r.ctx_held_bytes_step0)} of layer activations held on autograd "
                       f"contexts through the forward pass: gc-{r.grad_ckpt} cannot free them")
    return out


def held_markdown(rows: list[CompatRow]) -> list[str]:
    found = held_findings(rows)
    out = ["## Activations checkpointing cannot free", ""]
    out += [f"- {f}" for f in found] if found else ["None: no custom autograd function kept activations on its "
                                                     "context in a checkpointed cell."]
    return out + [""]


def group_id(model: str, precision: str, load: str) -> str:
    """'tiny-llama/bf16/pretrained': the cells whose checkpointing modes are compared."""
    return f"{model}/{precision}/{load}"


def checkpointing_groups(rows: Iterable[CompatRow]) -> dict[str, dict[str, CompatRow]]:
    groups: dict[str, dict[str, CompatRow]] = {}
    for r in rows:
        groups.setdefault(group_id(r.model, r.precision, r.load), {})[r.grad_ckpt] = r
    return groups


# -- tables --------------------------------------------------------------------------------

def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def loading_markdown(loading: dict[str, Any] | None) -> list[str]:
    """The loading-correctness cases (harness.cell.loader_checks) as a markdown section."""
    if not loading:
        return []
    out = ["## Loading by the seed's flags", ""]
    if not loading.get("cases"):
        return out + [f"Not run: {loading.get('status')}: {loading.get('error')}", ""]
    out.append(f"Model {loading.get('model')} on {loading.get('device')}:")
    out.append("")
    out += [f"- {'ok' if c.get('ok') else '**FAILED**'}: {c['case']}: {c.get('detail')}" for c in loading["cases"]]
    return out + [""]


def markdown(rows: list[CompatRow], host: str = "", loading: dict[str, Any] | None = None) -> str:
    head = ["precision", "ckpt", "load", "device", "predicted", "outcome", "agrees", "layers loaded",
            "recomputed / forward", "offloaded", "saved act. (step 0)", "held on ctx (step 0)", "peak memory", "torch peak alloc.",
            "step"]
    body = []
    for r in rows:
        body.append([r.precision, r.grad_ckpt, r.load, r.device or "-",
                     r.predicted if r.predicted == "supported" else f"unsupported ({r.prediction_rule})",
                     r.outcome + (f": {r.detail[:80]}" if r.detail else ""), "yes" if r.agrees else "**NO**",
                     r.layers, f"{r.layer_recomputes}/{r.layer_runs_forward}" if r.layer_runs_forward is not None
                     else "-", _mb(r.offloaded_bytes), _mb(r.saved_activation_bytes_step0),
                     _mb(r.ctx_held_bytes_step0),
                     f"{fmt_gib(r.peak_memory_bytes)} {r.memory_metric}" if r.peak_memory_bytes else "-",
                     fmt_gib(r.torch_peak_allocated_bytes) if r.torch_peak_allocated_bytes else "-",
                     f"{r.step_time_s * 1000:.0f} ms" if r.step_time_s else "-"])
    out = [f"# Compatibility{(' — ' + host) if host else ''}", "", markdown_table(head, body), ""]
    dis = [disagreement_text(r) for r in rows if not r.agrees]
    out.append("## Predictions the real attempt contradicted")
    out.append("")
    out += [f"- {d}" for d in dis] if dis else ["None: every prediction matched the attempt."]
    out.append("")
    out.append("## Checkpointing evidence across modes (per model x precision x load path)")
    out.append("")
    for key, group in checkpointing_groups(rows).items():
        probs = checkpointing_problems(group)
        out.append(f"- {key}: " + ("holds" if not probs else "; ".join(probs)))
    out.append("")
    out += held_markdown(rows)
    out += loading_markdown(loading)
    return "\n".join(out).rstrip() + "\n"


def report(records: Iterable[dict[str, Any]], host: str = "", loading: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows, disagreements and checkpointing findings of the compat records, as JSON data."""
    rows = [row_for(r) for r in records]
    return {
        "host": host,
        "loading": loading,
        "rows": [asdict(r) for r in rows],
        "disagreements": [disagreement_text(r) for r in rows if not r.agrees],
        "checkpointing": [{"group": k, "problems": checkpointing_problems(g)}
                          for k, g in checkpointing_groups(rows).items()],
        "held_on_autograd_ctx": held_findings(rows),
        "markdown": markdown(rows, host, loading),
    }


def suite_records(records: Iterable[dict[str, Any]], suite: str) -> list[dict[str, Any]]:
    """The latest record of each cell of ``suite`` (a resumed run may hold several)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("suite") == suite and "cell_id" in r:
            latest[r["cell_id"]] = r
    return list(latest.values())


def write_files(run_dir: str | os.PathLike, name: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """``<name>.md`` and ``<name>.json`` in the run folder, each written atomically."""
    d = Path(run_dir)
    md = d / f"{name}.md"
    js = d / f"{name}.json"
    for path, text in ((md, data["markdown"]), (js, json.dumps({k: v for k, v in data.items() if k != "markdown"},
                                                                 indent=2, default=str))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return md, js


def write_suite_reports(run_dir: str | os.PathLike) -> list[str]:
    """Write compat.md/.json and stability.md/.json for every record of those suites in
    the run folder (several invocations may share it); returns the markdown written."""
    from harness.core import host as env_mod
    from harness.report import stability
    from harness.core.store import load_records

    d = Path(run_dir)
    records = load_records(d / "results.jsonl") if (d / "results.jsonl").is_file() else []
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").is_file() else None
    loading = json.loads((d / "loading.json").read_text()) if (d / "loading.json").is_file() else None
    host = env_mod.summary(env) if env else ""
    written = []
    recs = suite_records(records, "compat")
    if recs or loading:
        data = report(recs, host=host, loading=loading)
        write_files(d, "compat", data)
        written.append(data["markdown"])
    recs = suite_records(records, "stability")
    if recs:
        data = stability.report(recs, host=host)
        write_files(d, "stability", data)
        written.append(data["markdown"])
    return written
