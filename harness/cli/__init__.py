"""``lora-harness`` command line. Thin: every subcommand calls the same functions the
pytest plugin uses. User errors end in one line on stderr and exit code 2.

    lora-harness run [options]     run the matrix, a progress line per cell
    lora-harness cells [options]   list the cells the options select (nothing runs)
    lora-harness env [--json]      this host's fingerprint
    lora-harness show RUN_DIR      the summary table of a run folder
    lora-harness report RUN_DIR... charts, report.md and report.html (harness.cli.report)
    lora-harness compare BASE CUR  regression check against a baseline (harness.cli.report)
    lora-harness fit [options]     longest trainable context per VRAM budget (harness.cli.fit)
    lora-harness tables RUN_DIR    the compatibility and stability tables of a run folder
    lora-harness agree RUN_A RUN_B do two runs of the same cells agree (harness.cli.report)
    lora-harness sweep-cost RUN_DIR  fixed cost per cell and totals of a run (harness.cli.perf)
    lora-harness shards RUN_DIR...  do shard run folders (--shard K/N) form a complete sweep (harness.cli.shards)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from harness.cli import report as cli_report
from harness.cli import perf as perfcli
from harness.cli import shards as cli_shards
from harness.core import host as env_mod
from harness.plan.options import OPTIONS, build_config
from harness.core.errors import SpecError
from harness.core.store import StoreError, load_records
from harness.core.fmt import SUMMARY_HEADERS, format_table, summary_rows
from harness.core.errors import CliError

EXIT_USAGE = 2


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matrix and cell settings")
    for o in OPTIONS:
        if o.kind == "flag":
            g.add_argument(f"--{o.name}", dest=o.dest, action="store_true", default=None, help=o.help)
        else:
            typ = {"int": int, "float": float}.get(o.kind, str)
            g.add_argument(f"--{o.name}", dest=o.dest, type=typ, default=None, help=o.help,
                           metavar=o.name.upper().replace("-", "_"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-harness", description="LoRA fine-tuning benchmark and compatibility harness")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the matrix")
    _add_sweep_options(run)
    cells = sub.add_parser("cells", help="list the cells the options select")
    _add_sweep_options(cells)
    e = sub.add_parser("env", help="print this host's fingerprint")
    e.add_argument("--json", action="store_true", help="JSON instead of a table")
    e.add_argument("--from-run", metavar="RUN_DIR", help="show the fingerprint stored in a run folder's env.json "
                                                         "instead of collecting this host's")
    show = sub.add_parser("show", help="summary table of a run folder")
    show.add_argument("run_dir")
    cli_report.add_commands(sub)  # report, compare (each sets its handler)
    cli_report.add_scale_commands(sub)  # agree (serial vs parallel runs)
    perfcli.add_commands(sub)  # sweep-cost
    cli_shards.add_commands(sub)  # shards: is a set of shard run folders a complete sweep
    fit = sub.add_parser("fit", help="longest trainable context per VRAM budget, by real cells under emulated budgets")
    _add_sweep_options(fit)
    fit.add_argument("--dry-run", action="store_true",
                     help="print the memory model's predictions (from --prior and the run folder); run nothing")
    tables = sub.add_parser("tables", help="(re)write and print the compatibility and stability tables of a run folder")
    tables.add_argument("run_dir")
    return p


def _config(ns: argparse.Namespace):
    from harness.run import sweep_facts

    facts = sweep_facts(vars(ns))  # with --ray a GPU node's, so `cells` lists what `run` runs
    return build_config(vars(ns), facts), facts


def cmd_cells(ns) -> int:
    cfg, facts = _config(ns)
    for c in cfg.cells:
        print(c.cell_id)
    print(f"{len(cfg.cells)} cells ({cfg.matrix} matrix, {'GPU' if facts['has_gpu'] else 'CPU'} host)", file=sys.stderr)
    if cfg.shard:
        print(cfg.shard.describe(), file=sys.stderr)
    return 0


def cmd_run(ns) -> int:
    from harness.run import open_sweep
    from harness.run.forkserver import RunnerError

    cfg, facts = _config(ns)
    baseline = _baseline_check(cfg)  # checked before anything runs
    where = facts["gpu_name"] if facts["has_gpu"] and cfg.device != "cpu" else "CPU (no GPU found)" if not facts["has_gpu"] else "CPU (--device cpu)"
    if cfg.gpus:  # one worker server pinned to each GPU, cells in parallel
        where = ", ".join(f"{g.label} ({g.name})" for g in cfg.gpus)
    if cfg.ray is not None:  # one worker per GPU of the cluster
        where = f"{cfg.ray.describe()} ({facts.get('gpu_name') or 'cells on the CPU'})"
    if cfg.shard:  # the split decided this shard's cells; none is a success, not an error
        print(f"lora-harness: {cfg.shard.describe()}", flush=True)
        if not cfg.cells:
            return 0
    print(f"lora-harness: {len(cfg.cells)} cells, {cfg.matrix} matrix, on {where}", flush=True)
    sweep = open_sweep(cfg, facts, command="lora-harness " + " ".join(sys.argv[1:]))
    try:
        sweep.open_store()
        sweep.run_all()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(sweep.records)} cells recorded in {sweep.store.dir if sweep.store else '?'}; "
              "rerun with --resume to continue", file=sys.stderr)
        return 130
    except RunnerError as exc:  # no worker left (a GPU pool's servers, a Ray cluster's nodes): what ran is kept
        print(f"lora-harness: error: {exc}; {len(sweep.records)} cells recorded in "
              f"{sweep.store.dir if sweep.store else '?'}", file=sys.stderr)
        return 1
    finally:
        sweep.close()
    print()
    print(format_table(SUMMARY_HEADERS, summary_rows(sweep.records)))
    bad = [r for r in sweep.records if r["status"] in ("error", "crash", "timeout")
           or (r["status"] == "oom" and cfg.fail_on_oom)]
    print(f"\n{len(sweep.records)} cells: " + ", ".join(f"{n} {s}" for s, n in _count(sweep.records).items())
          + f"; results in {sweep.store.dir}")
    if sweep.not_started:  # --time-limit: the sweep is incomplete, which is not a success
        print(f"{len(sweep.not_started)} cells not started: --time-limit {cfg.time_limit_s:g} s reached; "
              "rerun with --resume to continue")
        bad = bad or sweep.not_started
    if baseline is not None and sweep.records:  # compare with the baseline
        from harness.report.gate import check_sweep

        verdict = check_sweep(baseline, sweep.store.dir, [r["cell_id"] for r in sweep.records])
        print("\n".join(verdict.lines))
        bad = bad or verdict.failed
    if sweep.records and all(r["status"] == "unsupported" for r in sweep.records):
        # a sweep that measured nothing is no success (a GPU job on a host without it, a stack without its package)
        print(f"lora-harness: no cell could run on this host; first reason: "
              f"{str(sweep.records[0].get('error') or '?').splitlines()[0]}", file=sys.stderr)
        bad = True
    print(f"next: lora-harness report {sweep.store.dir}")
    return 1 if bad else 0


def _baseline_check(cfg):
    """--baseline / --baseline-fail, loaded and parsed before anything runs."""
    from harness.report import gate as regress

    try:
        return regress.from_options(cfg.options)
    except regress.BaselineError as exc:
        raise CliError(f"--baseline: {exc}") from None


def _count(records) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def cmd_env(ns) -> int:
    from harness.run.forkserver import ForkServerRunner, classify
    import tempfile

    if getattr(ns, "from_run", None):  # what a run recorded, without importing torch here
        from pathlib import Path

        path = Path(ns.from_run) / "env.json"
        if not path.is_file():
            raise CliError(f"{ns.from_run} holds no env.json")
        env = json.loads(path.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            with ForkServerRunner(tmp) as r:
                out = r.run_job("harness.cell.env:collect", {}, timeout_s=300, log_path=f"{tmp}/env.log")
            env = out.result or {"error": classify(out, 300)["error"]}
    if ns.json:
        print(json.dumps(env, indent=2, sort_keys=True))
        return 0
    rows = _env_rows(env)
    print(format_table(["fact", "value"], rows, align="ll"))
    return 0


def _env_rows(env: dict[str, Any]) -> list[list[str]]:
    rows = [["host", f"{env.get('hostname')} ({env.get('platform')})"], ["python", env.get("python")]]
    for d in env.get("devices") or []:
        rows.append([f"cuda:{d['index']}", f"{d['name']}, cc {d['compute_capability']}, "
                                           f"{d['memory_total_bytes'] / 2**30:.1f} GiB"])
    if not env.get("devices"):
        rows.append(["device", "CPU only (no CUDA device)"])
    drv = env.get("driver_version")
    dcuda = env.get("driver_cuda_version")
    rows.append(["NVIDIA driver", (f"{drv}" + (f" (supports CUDA {dcuda})" if dcuda else "")) if drv else "none"])
    rows.append(["torch built for CUDA", env.get("torch_cuda_version") or "none (CPU-only build)"])
    rows.append(["NVML", "available" if env.get("nvml_available") else f"unavailable ({env.get('nvml_error')})"])
    rows.append(["bf16 supported", str(env.get("bf16_supported"))])
    bnb = env.get("bitsandbytes") or {}
    rows.append(["bitsandbytes backend", bnb.get("backend") or f"none ({bnb.get('error')})"])
    if bnb.get("library"):
        rows.append(["bitsandbytes library", bnb["library"]])
    for k, v in (env.get("packages") or {}).items():
        rows.append([k, str(v)])
    for k, v in (env.get("attention") or {}).items():
        rows.append([f"attention: {k}", str(v)])
    return [[str(a), str(b)] for a, b in rows]


def cmd_show(ns) -> int:
    from pathlib import Path

    d = Path(ns.run_dir)
    if not (d / "results.jsonl").is_file():
        raise CliError(f"{d} is not a run folder (no results.jsonl)")
    recs = load_records(d / "results.jsonl")
    if not recs:
        raise CliError(f"{d}/results.jsonl holds no records")
    print(format_table(SUMMARY_HEADERS, summary_rows(recs)))
    from harness.report.cell_rate import describe  # cells per hour

    for line in describe(d):
        print(line)
    return 0


def cmd_fit(ns) -> int:
    from harness.cli.fit import FitUsageError, cmd_fit as run_fit

    try:
        return run_fit(vars(ns), env_mod.quick_facts(), dry_run=ns.dry_run,
                       command="lora-harness " + " ".join(sys.argv[1:]))
    except FitUsageError as exc:
        raise CliError(str(exc)) from None


def cmd_tables(ns) -> int:
    """compat.md/.json and stability.md/.json from a run folder's records."""
    from pathlib import Path

    from harness.report.compat import write_suite_reports

    d = Path(ns.run_dir)
    if not (d / "results.jsonl").is_file():
        raise CliError(f"{d} is not a run folder (no results.jsonl)")
    written = write_suite_reports(d)
    if not written:
        raise CliError(f"{d} holds no compatibility or stability records (run suites/test_compat.py or "
                       "suites/test_stability.py)")
    print("\n".join(written))
    return 0


def _clean_warnings() -> None:
    """The harness's warnings (damaged input, records of a newer harness) as one clean
    line each, never Python's two-line form; other libraries' as they come."""
    import warnings

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning) and category.__module__ == "builtins":
            print(f"lora-harness: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    _clean_warnings()
    ns = parser().parse_args(argv)
    try:
        handler = getattr(ns, "handler", None) or {"run": cmd_run, "cells": cmd_cells, "env": cmd_env,
                                                   "show": cmd_show,
                                                   "fit": cmd_fit, "tables": cmd_tables}[ns.command]
        return handler(ns)
    except (SpecError, StoreError, CliError) as exc:
        print(f"lora-harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
