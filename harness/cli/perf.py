"""``lora-harness sweep-cost RUN_DIR``: the fixed cost of each cell of a run and the run's
totals (the tables are ``harness.report.perf_tables``). Reads the run folder only, so it
works on any run, old records included (their fixed cost is approximate, and marked)."""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("sweep-cost", help="fixed cost per cell and totals of a run folder")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="JSON instead of markdown")
    p.add_argument("--out", help="also write sweep-cost.md and sweep-cost.json into this folder")
    p.set_defaults(handler=cmd_sweep_cost)


def cmd_sweep_cost(ns) -> int:
    from harness.core.errors import CliError
    from harness.report.perf_tables import sweep_cost_markdown, sweep_cost_of_run

    d = Path(ns.run_dir)
    if not (d / "results.jsonl").is_file():
        raise CliError(f"{d} is not a run folder (no results.jsonl)")
    cost = sweep_cost_of_run(d)
    if not cost["cells"]:
        raise CliError(f"{d}/results.jsonl holds no records")
    md = sweep_cost_markdown(cost)
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep-cost.md").write_text(md)
        (out / "sweep-cost.json").write_text(json.dumps(cost, indent=2, default=str))
    print(json.dumps(cost, indent=2, default=str) if ns.json else md, end="" if not ns.json else "\n")
    return 0
