"""Why does the ``offload`` checkpointing mode fit a shorter context than ``on`` under a
VRAM budget, although it allocates less?

The H200 data (Llama-3.1-8B preset, bf16, 40 GiB budget): offload's longest context
11,776 tokens, plain checkpointing's 12,032; torch allocated 1.49 vs 1.73 MiB per token.
A budget judges the NVML peak, which follows what the caching allocator *reserves*, not
what tensors hold. The offload mode (``harness/cell/checkpointing.py``, ``_OffloadedLayer``)
copies every decoder layer's input to pinned host memory on a side stream and calls
``hidden.record_stream(side)``: a block so marked is not reusable after its free until
the allocator has seen the side stream's event complete, which can make it reserve more
(and split blocks more) than the tensors need. This script measures it.

One real harness cell (``harness.cell.train.run_cell``, fresh forked process) per
precision x variant:

- ``on``: plain (non-reentrant) checkpointing;
- ``offload``: today's offload (side stream + ``record_stream``);
- ``offload-current-stream``: the copy on the current stream, no ``record_stream``
  (as Unsloth's ``hidden.to("cpu", non_blocking=True)``);
- ``offload-hold``: side stream, no ``record_stream``: the input kept referenced until
  its copy's event has completed (released at the next layer's forward or at the start
  of the backward pass, after the current stream waited for the event);
- any of them with ``-es``: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.

(The variants are chosen in the cell by ``LORA_HARNESS_OFFLOAD_VARIANT``, see
``harness/cell/checkpointing.py``.) Per cell: torch peak allocated and reserved and their
ratio, allocated / reserved MiB per token, the NVML peak (and over the baseline), the
allocator's ``memory_stats()`` (inactive split bytes peak, alloc retries, OOMs, ...),
the step time, and the losses (the variants compute the same thing: on the CPU the
offload variants' losses are identical).

Output in ``--out``: ``offload_memory.md``, ``offload_memory.json``, ``logs/``.

Time on one H200 (8B, 8192 tokens, 1 warm-up + 2 steps): worker server ~22 s, the
synthetic checkpoint ~25 s once per machine (nf4; loaded ~3 s a cell), per cell ~2 s
build (bf16) or ~3 s load (nf4), ~1 s LoRA, 3 steps of 1.1-1.4 s, ~1 s teardown:
~7-9 s a cell, 6 variants x 2 precisions ~100 s; ~150 s with the server and the checkpoint.

    python benchmarks/offload_memory.py --out reports/runs/h200-diag/offload --time-limit 150
    python benchmarks/offload_memory.py --model tiny-llama --seq-len 64 --precisions bf16 --device cpu \\
        --out /tmp/offload                                                        # CPU rehearsal
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagcommon import Budget, CellRunner, allocator_stats, cells_for, gib, log, write  # noqa: E402

# variant -> (checkpointing mode, offload copy variant)
VARIANTS = {"on": ("on", None), "offload": ("offload", "record-stream"),
            "offload-current-stream": ("offload", "current-stream"), "offload-hold": ("offload", "hold")}
DEFAULT_VARIANTS = "on,offload,offload-current-stream,offload-hold,on-es,offload-es"
TARGET = "benchmarks.offload_memory:variant_job"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--precisions", default="bf16,nf4")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(VARIANTS)}, each optionally with -es (expandable segments)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cell-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=None, help="start no cell that would end after this many s")
    a = p.parse_args(argv)
    for v in a.variants.split(","):
        if v.removesuffix("-es") not in VARIANTS:
            p.error(f"variant {v!r}: use {', '.join(VARIANTS)} (optionally with -es)")
    return a


def variant_job(spec_dict: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """The cell (in the forked process): a harness cell plus the allocator's statistics."""
    import torch

    from harness.cell.train import CellHooks, run_cell

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    conf_error = None
    if conf and torch.cuda.is_available():
        # torch may have read the variable when the worker server imported it, before this
        # process set it: apply it here, before this process's first CUDA allocation
        try:
            torch.cuda.memory._set_allocator_settings(conf)
        except Exception as exc:  # noqa: BLE001 - the record says so
            conf_error = f"{type(exc).__name__}: {exc}"

    class StatsHooks(CellHooks):
        def after_train(self, model, out):
            device = next(model.parameters()).device
            out["allocator"] = allocator_stats(device)
            out["expandable_segments_in_effect"] = _expandable_in_effect(device)

    rec = run_cell(spec_dict, opts, hooks=StatsHooks())
    rec["alloc_conf"], rec["alloc_conf_error"] = conf, conf_error
    return rec


def _expandable_in_effect(device) -> bool | None:
    """Whether the allocator's segments are expandable ones (None: cannot tell)."""
    import torch

    if device.type != "cuda":
        return None
    try:
        flags = {seg.get("is_expandable") for seg in torch.cuda.memory._snapshot(device)["segments"]}
    except Exception:  # noqa: BLE001
        return None
    return True if True in flags else (False if flags == {False} else None)


def _row(precision: str, variant: str, res: dict[str, Any], seq_len: int) -> dict[str, Any]:
    alloc, reserved = res.get("torch_peak_allocated_bytes"), res.get("torch_peak_reserved_bytes")
    ev = res.get("grad_ckpt_evidence") or {}
    return {"precision": precision, "variant": variant, "status": res.get("status"), "error": res.get("error"),
            "offload_variant": ev.get("offload_variant"), "alloc_conf": res.get("alloc_conf"),
            "alloc_conf_error": res.get("alloc_conf_error"),
            "expandable_segments_in_effect": res.get("expandable_segments_in_effect"),
            "torch_peak_allocated_bytes": alloc, "torch_peak_reserved_bytes": reserved,
            "reserved_over_allocated": reserved / alloc if alloc and reserved else None,
            "allocated_mib_per_token": alloc / 2**20 / seq_len if alloc else None,
            "reserved_mib_per_token": reserved / 2**20 / seq_len if reserved else None,
            "nvml_peak_bytes": res.get("peak_vram_bytes"), "nvml_over_baseline_bytes": res.get("peak_vram_over_baseline_bytes"),
            "allocator": res.get("allocator"), "step_time_s": res.get("step_time_s"), "losses": res.get("losses"),
            "offloaded_bytes": ev.get("offloaded_bytes"), "wall_time_s": res.get("wall_time_s"), "log": res.get("log")}


def _loss_diffs(rows: list[dict[str, Any]]) -> None:
    """Each row's largest relative loss difference from its precision's ``on`` (and, for
    the offload variants, from today's ``offload``)."""
    for r in rows:
        for ref_name, key in (("on", "loss_max_rel_diff_vs_on"), ("offload", "loss_max_rel_diff_vs_offload")):
            ref = next((x for x in rows if x["precision"] == r["precision"] and x["variant"] == ref_name), None)
            a, b = (r.get("losses") or []), ((ref or {}).get("losses") or [])
            n = min(len(a), len(b))
            r[key] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n])) if n else None


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Offload vs plain checkpointing: where the memory goes", "", f"Host: {data['host']}.", "",
             "Torch peaks are the caching allocator's (allocated: live tensors; reserved: what it holds from the "
             "device); NVML counts the whole device, so a VRAM budget follows *reserved*. Inactive split: memory in "
             "split blocks that are free but cannot be released (fragmentation). `-es`: expandable segments "
             "(in effect per the allocator's segments: see the JSON's `expandable_segments_in_effect`).", "",
             "| precision | variant | status | allocated GiB | reserved GiB | reserved / allocated | alloc / reserved "
             "MiB per token | NVML peak (over baseline) GiB | inactive split peak GiB | alloc retries | OOMs | step s "
             "| losses vs on / vs offload |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        al = r.get("allocator") or {}
        rel = " / ".join("n/a" if r.get(k) is None else f"{r[k]:.2g}"
                         for k in ("loss_max_rel_diff_vs_on", "loss_max_rel_diff_vs_offload"))
        per_tok = (f"{r['allocated_mib_per_token']:.3f} / {r['reserved_mib_per_token']:.3f}"
                   if r.get("allocated_mib_per_token") and r.get("reserved_mib_per_token") else "n/a")
        status = r["status"] + (f" ({str(r['error'])[:60]})" if r.get("error") else "")
        lines.append(
            f"| {r['precision']} | {r['variant']} | {status} | {gib(r['torch_peak_allocated_bytes'])} | "
            f"{gib(r['torch_peak_reserved_bytes'])} | "
            f"{'n/a' if r['reserved_over_allocated'] is None else format(r['reserved_over_allocated'], '.3f')} | "
            f"{per_tok} | {gib(r['nvml_peak_bytes'])} ({gib(r['nvml_over_baseline_bytes'])}) | "
            f"{gib(al.get('inactive_split_bytes.all.peak'))} | {al.get('num_alloc_retries', 'n/a')} | "
            f"{al.get('num_ooms', 'n/a')} | {'n/a' if r['step_time_s'] is None else format(r['step_time_s'], '.3f')} "
            f"| {rel} |")
    lines += ["", f"Elapsed: {data['elapsed_s']:.0f} s" + (f" (time limit {data['time_limit']:g} s)"
                                                          if data.get("time_limit") else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    budget = Budget(a.time_limit)
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    modes = sorted({VARIANTS[v.removesuffix("-es")][0] for v in variants})
    cells, cfg, facts = cells_for(a, precisions, modes)
    runner = CellRunner(out, budget, a.cell_timeout)
    rows: list[dict[str, Any]] = []
    interrupted = False
    try:
        runner.checkpoints(cfg)
        for precision in precisions:
            for variant in variants:
                mode, copy = VARIANTS[variant.removesuffix("-es")]
                env = {"LORA_HARNESS_OFFLOAD_VARIANT": copy or ""}
                if variant.endswith("-es"):
                    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
                    env["PYTORCH_CUDA_ALLOC_CONF"] = (conf + "," if conf else "") + "expandable_segments:True"
                cell = cells[(precision, mode)].replace(tag=variant)
                res = runner.run(TARGET, f"{precision}/{variant}", cell, cfg.worker_opts(), env=env)
                rows.append(_row(precision, variant, res, a.seq_len))
    except KeyboardInterrupt:  # the job's hard stop: report what ran
        interrupted = True
    finally:
        runner.close()
    _loss_diffs(rows)
    gpu = facts.get("gpu_name") if facts.get("has_gpu") and a.device != "cpu" else None
    host = f"{gpu or 'CPU'}; {a.model}, {a.seq_len} tokens, {a.warmup_steps} warm-up + {a.steps} measured steps"
    data = {"host": host + ("; interrupted" if interrupted else ""), "rows": rows, "elapsed_s": budget.elapsed(),
            "time_limit": a.time_limit, "interrupted": interrupted, "settings": vars(a)}
    md = markdown(data)
    write(out, "offload_memory", data, md)
    print(md)
    log(f"offload_memory: done after {budget.elapsed():.0f} s")
    return 1 if interrupted or any(r["status"] not in ("ok", "oom", "not run") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
