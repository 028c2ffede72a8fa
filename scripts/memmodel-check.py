#!/usr/bin/env python3
"""The memory models' predictions of the longest context against measured fit answers.

    python scripts/memmodel-check.py RUN_DIR [RUN_DIR ...]

Reads every run folder's records (matrix cells and fit probes) and the fit answers in
their fit.json files (later folders override earlier ones for the same row and budget),
and prints harness.fit.evaluate's table: for each answer, the allocated-bytes model's and
the reserved-bytes model's prediction made from the row's cells without a budget, and
each one's error.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.core.store import load_records  # noqa: E402
from harness.fit import evaluate  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: scripts/memmodel-check.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    records, answers = [], {}
    for d in map(Path, argv):
        if not (d / "results.jsonl").is_file():
            print(f"memmodel-check: error: {d} is not a run folder (no results.jsonl)", file=sys.stderr)
            return 2
        records += load_records(d / "results.jsonl")
        if (d / "fit.json").is_file():
            for row in json.loads((d / "fit.json").read_text()).get("rows") or []:
                for a in row.get("answers") or []:
                    answers[(row["row"], a["budget_bytes"])] = dict(
                        a, model=row["model"], precision=row["precision"], grad_ckpt=row["grad_ckpt"],
                        batch_size=row.get("batch_size") or 1)
    ordered = sorted(answers.values(), key=lambda a: (a["budget_bytes"], a["precision"], a["grad_ckpt"]))
    print(evaluate.markdown(evaluate.evaluate(records, ordered)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
