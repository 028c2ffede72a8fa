"""Repeatability of the harness's measurements.

Runs each given cell ``--reps`` times, each time in a fresh process forked by the
harness's worker server (rep-major order: every cell once, then every cell again, so the
repeats of a cell are spread over the run), or with ``--fresh-server`` in a fresh run
(a new worker server, i.e. a new interpreter that imports the libraries again, per
repetition). Then, per cell: the spread (max - min) / median of the NVML peak, the
torch allocator's peaks and tokens/s over the repeats, against the targets (memory 1%,
tokens/s 3%), in ``repeatability.md`` / ``repeatability.json``.

``--from-run RUN_DIR [...]`` only analyses records that exist (cells recorded several
times, e.g. benchmarks/overhead.py's ``harness-run/``: repetition tags ``/r0``, ``/r1``,
... are ignored when grouping).

    python benchmarks/repeatability.py --out reports/runs/h200-perf/repeatability
    python benchmarks/repeatability.py --from-run reports/runs/h200-perf/overhead/harness-run --out /tmp/rep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfcommon import DEFAULT_CELLS, Deadline, parse_cells, sweep_config, write_outputs  # noqa: E402

from harness.report.perf_tables import repeatability, repeatability_markdown  # noqa: E402
from harness.core.store import load_records  # noqa: E402
from harness.run.sweep import Sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--cells", default=DEFAULT_CELLS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5, the matrix's)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cell-timeout", type=float, default=None)
    p.add_argument("--nvml-period-ms", type=float, default=None)
    p.add_argument("--fresh-server", action="store_true", help="a new worker server (run folder) per repetition")
    p.add_argument("--time-limit", type=float, default=None, help="start no new cell after this many seconds")
    p.add_argument("--from-run", nargs="+", help="analyse these run folders instead of running cells")
    return p.parse_args(argv)


def run_cells(a, out: Path, deadline: Deadline) -> tuple[list[dict], str]:
    cells = parse_cells(a.cells)
    records: list[dict] = []
    env: dict = {}
    interrupted = False
    command = "benchmarks/repeatability.py " + " ".join(sys.argv[1:])
    for s in range(a.reps if a.fresh_server else 1):
        run_dir = out / (f"run-r{s}" if a.fresh_server else "run")
        cfg, facts = sweep_config(model=a.model, cells=cells, run_dir=run_dir, steps=a.steps,
                                  warmup_steps=a.warmup_steps, device=a.device, cache_dir=a.cache_dir,
                                  cell_timeout=a.cell_timeout, nvml_period_ms=a.nvml_period_ms)
        reps = [s] if a.fresh_server else range(a.reps)
        with Sweep(cfg, facts, command=command, total=len(cfg.cells) * len(reps)) as sweep:
            try:
                for k in reps:
                    for cell in cfg.cells:
                        if not deadline.passed():
                            records.append(sweep.run(cell.replace(tag=f"r{k}")))
            except KeyboardInterrupt:  # the job's hard stop: report what ran
                interrupted = True
            env = sweep.env or env
        if interrupted:
            break
    host = f"{env.get('gpu_name') or 'CPU'}; torch {(env.get('packages') or {}).get('torch')}"
    return records, host + ("; interrupted" if interrupted else "")


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    deadline = Deadline(a.time_limit)
    if a.from_run:
        records = [r for d in a.from_run for r in load_records(Path(d) / "results.jsonl")]
        note = "Records from " + ", ".join(f"`{d}`" for d in a.from_run) + "."
    else:
        records, host = run_cells(a, out, deadline)
        note = (f"Host: {host}; {a.model}, {a.warmup_steps} warm-up + {a.steps} measured steps, {a.reps} repeats, "
                + ("a new worker server per repeat" if a.fresh_server else "one worker server, a forked process per "
                   "cell") + (f"; stopped at the {a.time_limit:g} s time limit" if deadline.passed() else ""))
    rows = repeatability(records)
    md = repeatability_markdown(rows, note=note)
    write_outputs(out, "repeatability", {"rows": rows, "note": note, "elapsed_s": deadline.elapsed(),
                                         "records": len(records)}, md)
    print(md)
    bad = [r for r in records if r.get("status") != "ok"]
    for r in bad:
        print(f"[repeatability] {r.get('cell_id')}: {r.get('status')}: {r.get('error')}", file=sys.stderr)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
