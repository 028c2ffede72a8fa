"""The harness's own overhead: the bare loop vs the harness, on the same cells.

For each cell (default: the Llama-3.1-8B preset, bf16 at 2048 tokens with checkpointing
off and on, nf4 at 2048 with checkpointing on) and each repetition, three runs:

- ``bare``: ``benchmarks/bare_lora.py`` in a fresh interpreter (no harness worker, no
  trackers, no proofs), the same model, LoRA, batches, optimizer, autocast and steps;
- ``harness``: the cell through the harness's normal path (a ``harness.run.sweep.Sweep``:
  the worker server forks a fresh process for the cell; records in ``harness-run/``);
- ``harness-nvml-off``: the same with the NVML sampler off (``--nvml-period-ms 0``);
- with ``--sampler-process`` also ``harness-sampler-process``: the sampler polling from a
  process of its own (``--sampler-mode process``) instead of a thread.

The order of the three is rotated from one run to the next (a Latin square over the
repetitions), so a slow drift of the machine does not favour one of them. Every run
uses the same warm-up and measured steps (defaults 3 + 20: a 5-step median at 2048
tokens is too coarse for a 3% comparison).

Output in ``--out``: ``overhead.md`` and ``overhead.json`` (per cell: tokens/s bare vs
harness and their ratio, torch peak allocated bare vs harness and their ratio, sampler
on / off ratio, each against its target: 3%, 1%, 1%; every run's figures), the bare
runs' JSON and logs in ``bare/``, the harness's run folder in ``harness-run/``.

    python benchmarks/overhead.py --out reports/runs/h200-perf/overhead            # a GPU host
    python benchmarks/overhead.py --model tiny-llama --cells bf16/s64/gc-off --reps 1 --steps 2 \\
        --out /tmp/overhead                                                       # CPU rehearsal
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfcommon import (DEFAULT_CELLS, ROOT, Deadline, parse_cells, short_name, sweep_config,  # noqa: E402
                        write_outputs)

from harness.core.models import get_preset  # noqa: E402
from harness.cell.build import checkpoint_dir  # noqa: E402
from harness.report.perf_tables import overhead_markdown, overhead_rows  # noqa: E402
from harness.run.sweep import Sweep  # noqa: E402

KINDS = ("bare", "harness", "harness-nvml-off", "harness-sampler-process")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--cells", default=DEFAULT_CELLS, help=f"comma list of PRECISION/sLENGTH/gc-MODE (default {DEFAULT_CELLS})")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each (bare, harness, sampler off) triple")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--cache-dir", default=None, help="synthetic checkpoints (default: the harness's)")
    p.add_argument("--cell-timeout", type=float, default=None)
    p.add_argument("--no-sampler-off", action="store_true", help="skip the sampler-off runs")
    p.add_argument("--sampler-process", action="store_true",
                   help="also run the harness with the sampler in a process of its own (--sampler-mode process)")
    p.add_argument("--time-limit", type=float, default=None, help="start no new run after this many seconds")
    return p.parse_args(argv)


def run_bare(a, cell, k: int, out: Path, checkpoint: Path | None) -> dict:
    name = f"{short_name(cell).replace('/', '_')}-r{k}"
    json_out = out / "bare" / f"{name}.json"
    log = out / "bare" / f"{name}.log"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_lora.py"), "--model", cell.model, "--precision",
           cell.precision, "--seq-len", str(cell.seq_len), "--batch-size", str(cell.batch_size), "--grad-ckpt",
           cell.grad_ckpt, "--warmup-steps", str(cell.warmup_steps), "--steps", str(cell.steps), "--lora-rank",
           str(cell.lora.rank), "--lora-alpha", str(cell.lora.alpha), "--lora-dropout", str(cell.lora.dropout),
           "--lr", str(cell.lr), "--seed", str(cell.seed), "--device", a.device, "--json-out", str(json_out)]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    # the environment a harness worker gets (harness/cell/server.py sets these for its children)
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              timeout=a.cell_timeout or 900)
    if proc.returncode != 0 or not json_out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"status": "error", "error": f"bare_lora.py exited {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(json_out.read_text())
    res["status"] = "ok"
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(a.time_limit)
    cfg, facts = sweep_config(model=a.model, cells=parse_cells(a.cells), run_dir=out / "harness-run",
                              steps=a.steps, warmup_steps=a.warmup_steps, device=a.device, cache_dir=a.cache_dir,
                              cell_timeout=a.cell_timeout)
    kinds = [k for k in KINDS if not (a.no_sampler_off and k == "harness-nvml-off")
             and not (not a.sampler_process and k == "harness-sampler-process")]
    runs: list[dict] = []
    interrupted = False
    sweep = Sweep(cfg, facts, command="benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  total=len(cfg.cells) * a.reps * (len(kinds) - 1))
    try:
        sweep.start()
        checkpoints = {}
        for cell in cfg.cells:  # quantised cells load the synthetic checkpoint: both sides need it first
            if cell.resolved_load() == "pretrained" and cell.model not in checkpoints:
                job = sweep.launcher.run_job("harness.cell.build:ensure_checkpoint_job",
                                             {"model": cell.model, "cache_dir": cfg.cache_dir, "device": cfg.device},
                                             timeout_s=900, log_path=sweep.store.dir / "logs" / "checkpoint.log")
                if not job.result or job.result.get("status") != "ok":
                    raise SystemExit(f"could not write the synthetic checkpoint of {cell.model}: see "
                                     f"{sweep.store.dir / 'logs' / 'checkpoint.log'}")
                checkpoints[cell.model] = checkpoint_dir(get_preset(cell.model), cfg.cache_dir)
        for k in range(a.reps):
            for ci, cell in enumerate(cfg.cells):
                shift = (k + ci) % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    if deadline.passed():
                        break
                    if kind == "bare":
                        res = run_bare(a, cell, k, out, checkpoints.get(cell.model))
                        print(f"[overhead] {short_name(cell)} r{k} bare: {res.get('status')}, "
                              f"{res.get('tokens_per_s') or 0:,.1f} tokens/s", flush=True)
                    else:
                        off = kind == "harness-nvml-off"
                        sweep.config = dataclasses.replace(
                            cfg, nvml_period_s=0.0 if off else cfg.nvml_period_s,
                            sampler_mode="process" if kind == "harness-sampler-process" else "thread")
                        rec = sweep.run(cell.replace(tag=f"r{k}" + kind[len("harness"):]))
                        sweep.config = cfg
                        res = {f: rec.get(f) for f in ("status", "error", "tokens_per_s", "step_time_s",
                                                       "step_times_s", "torch_peak_allocated_bytes",
                                                       "torch_peak_reserved_bytes", "peak_vram_bytes", "losses",
                                                       "memory_sampler", "sampler_mode", "fixed_cost_s",
                                                       "wall_time_s", "cell_id")}
                    runs.append(dict(res, cell=short_name(cell), kind=kind, rep=k))
    except KeyboardInterrupt:  # the job's hard stop: report what ran
        interrupted = True
    finally:
        sweep.close()
    rows = overhead_rows(runs)
    env = sweep.env or {}
    where = (f"{env.get('gpu_name') or 'CPU'}; torch {((env.get('packages') or {}).get('torch'))}; "
             f"{a.model}, {a.warmup_steps} warm-up + {a.steps} measured steps, {a.reps} repetitions"
             + (f"; stopped at the {a.time_limit:g} s time limit" if deadline.passed() else "")
             + ("; interrupted" if interrupted else ""))
    md = overhead_markdown(rows, note=f"Host: {where}. Harness records: `harness-run/`; bare runs: `bare/`.")
    write_outputs(out, "overhead", {"rows": rows, "runs": runs, "host": where, "elapsed_s": deadline.elapsed(),
                                    "env": {k: env.get(k) for k in ("hostname", "gpu_name", "worker_mode",
                                                                    "worker_preload_s", "worker_start_s")}}, md)
    print(md)
    failed = [r for r in runs if r.get("status") != "ok"]
    for r in failed:
        print(f"[overhead] {r['cell']} r{r['rep']} {r['kind']}: {r.get('status')}: {r.get('error')}", file=sys.stderr)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
