"""``lora-harness fit``: the longest-context search from the command line (a thin skin
over :class:`harness.fit.search.FitSearch`, like ``suites/test_fit.py``).

    lora-harness fit --model llama-3.1-8b --precision bf16,nf4 --grad-ckpt on,offload \\
        --budgets 16,24,40,80 [--granularity 256] [--max-seq-len N] [--prior RUN_DIR] [--run-dir DIR]
    lora-harness fit ... --dry-run     # the memory model's predictions; runs nothing, needs no GPU

Budgets are searched smallest first, every row at one budget before the next, so a
``--time-limit`` (counted from the process's start) leaves complete columns. Exit status: 0 when every answer was measured,
1 when some were not (error, time limit), 2 for a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from harness.fit import report as fitreport
from harness.fit.search import FitSearch, fit_rows, fit_settings, load_prior, open_search
from harness.core.phases import process_started_at
from harness.core.store import load_records


class FitUsageError(Exception):
    pass


def title_for(cells) -> str:
    c = cells[0]
    return (f"Will it fit? {c.model}, batch {c.batch_size}, LoRA r{c.lora.rank} ({c.lora.target_modules}), "
            f"{c.optimizer}")


def cmd_fit(values: dict[str, Any], facts: dict[str, Any], *, dry_run: bool, command: str) -> int:
    from harness.plan.options import build_config

    cfg = build_config(values, facts)
    if cfg.shard:  # a search decides its next cell from the last one: there is no fixed list to split
        raise FitUsageError("--shard splits the cells of run and pytest suites/; fit searches one row at a time "
                            "(split a fit by --model or --budgets instead)")
    if cfg.ray is not None:  # the same reason as --gpus: one search, one GPU
        raise FitUsageError("fit runs its search on one GPU; --ray is for run and the matrix suites")
    if cfg.gpus:  # the pool runs matrices; a search decides its next cell from the last one
        raise FitUsageError("fit runs its search on one GPU; --gpus is for run and the matrix suites "
                            "(pin a search with CUDA_VISIBLE_DEVICES=<index>)")
    use_gpu = bool(facts.get("has_gpu")) and cfg.device != "cpu"
    if not dry_run and facts.get("has_gpu") and not use_gpu:
        raise FitUsageError("fit runs cells under VRAM budgets on the GPU; --device cpu cannot (try --dry-run)")
    settings = fit_settings(values, facts, need_device=not dry_run)
    rows = fit_rows(cfg.cells)
    prior = load_prior(settings.prior_dirs)
    title = title_for(rows)
    if dry_run:
        results = Path(cfg.run_dir or "", "results.jsonl")
        records = load_records(results) if cfg.run_dir and results.is_file() else []  # read only: creates nothing
        search = FitSearch(settings, measure=_refuse, records=records, prior=prior)
        for b in settings.budgets_bytes:
            for row in rows:
                search.peek(row, b)
        print("lora-harness fit --dry-run: nothing was run; 'measured' entries come from records already in "
              "the run folder, the rest are the memory model's predictions.\n")
        print(fitreport.text(fitreport.build(search)))
        return 0
    from harness.run.sweep import Sweep

    sweep = Sweep(cfg, facts, command=command, total=0)
    store = sweep.open_store()
    search = open_search(settings, sweep, started_at=process_started_at())
    print(f"lora-harness fit: {len(rows)} rows x {len(settings.budgets_bytes)} budgets on {facts.get('gpu_name')}; "
          f"run folder {store.dir}", flush=True)
    try:
        for b in settings.budgets_bytes:
            for row in rows:
                ans = search.solve(row, b)
                fitreport.write(search, store.dir, title)  # a killed search keeps its table
                print(f"fit: {ans.row} @ {b / 2 ** 30:g} GiB -> "
                      f"{fitreport.answer_text(ans.status, ans.longest, search.grid(row).hi)}"
                      + (f" ({ans.message})" if ans.message else ""), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; records so far are in {store.dir}", file=sys.stderr)
        return 130
    finally:
        sweep.close()
    data = fitreport.write(search, store.dir, title)
    print()
    print(fitreport.text(data))
    print(f"\nfit.md, fit.json, fit.png and results.jsonl in {store.dir}")
    return 0 if all(a.measured for a in search.answers.values()) else 1


def _refuse(cell):  # pragma: no cover - a dry run never measures
    raise RuntimeError("dry run: no cell may run")
