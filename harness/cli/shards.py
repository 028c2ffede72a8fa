"""``lora-harness shards RUN_DIR...``: do shard run folders (``--shard K/N``) form a complete
sweep? Registered by ``harness.cli``; the work is in harness.report.shards.

Exit codes: 0 complete, 1 incomplete (a shard or cells missing, folders of different
sweeps; with --strict also a cell recorded twice), 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="do shard run folders (--shard K/N) form a complete sweep?",
                       description="Read shard run folders and say which shards are present or missing, which "
                                   "cells no folder recorded, which two folders recorded, and whether all came "
                                   "from the same split. Exit 0: complete, 1: incomplete, 2: unusable input.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="shard run folders; a folder of run folders or a quoted glob ('/shared/lora-runs/*') "
                        "reads every run in it")
    p.add_argument("--json", action="store_true", help="the verdict as JSON instead of lines")
    p.add_argument("--strict", action="store_true", help="a cell recorded by two folders is incomplete too")
    p.set_defaults(handler=cmd_shards)


def cmd_shards(ns: argparse.Namespace) -> int:
    from harness.report import shards as S

    try:
        paths, notes = S.find_runs(ns.run_dirs)
    except S.ShardCheckError as exc:
        print(f"lora-harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdict = S.check([S.read_run(p) for p in paths], strict=ns.strict)
    verdict.notes[:0] = notes
    if ns.json:
        print(json.dumps(S.to_json(verdict), indent=2))
    else:
        print("\n".join(S.lines(verdict)))
    return 0 if verdict.complete else 1
