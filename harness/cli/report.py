"""``lora-harness report`` and ``lora-harness compare``, registered by
``harness.cli``. Thin: the work is in harness.report.build and harness.report.gate.

    lora-harness report RUN_DIR [RUN_DIR ...] [--out DIR]
    lora-harness compare BASELINE [BASELINE ...] CURRENT [--fail METRIC:+N%] [--out FILE]

Exit codes: report 0 (written) / 2 (unusable input); compare 0 (no regression) /
1 (regression) / 2 (unusable input). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
EXIT_USAGE = 2


def _error(msg: str) -> int:
    print(f"lora-harness: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _warn(lines) -> None:
    for w in lines:
        print(f"lora-harness: warning: {w}", file=sys.stderr)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands to the CLI's parser, each with its ``handler``."""
    rep = sub.add_parser("report", help="charts, report.md and report.html of run folders",
                         description="Write charts (PNG, SVG), report.md and a self-contained report.html.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                     help="run folder(s) (or results.jsonl files); a folder of run folders or a quoted glob "
                          "('/shared/lora-runs/*') reads every run in it")
    rep.add_argument("--out", help="folder for the report (default: the run folder; required for several runs)")
    cmp = sub.add_parser("compare", help="compare a run with a baseline; exit 1 on regression",
                         description="Compare CURRENT with BASELINE (several baseline folders pool their "
                                     "measurements). Exit 0: every check passed; 1: a regression (a metric past its "
                                     "threshold, a worse status, a baseline cell or metric missing from CURRENT); "
                                     "2: unusable input, or a threshold no cell could check; 3: no regression, but a "
                                     "change inside an unstable cell (measured steps that disagree) cannot be told "
                                     "from noise.")
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="BASELINE [BASELINE ...] CURRENT")
    cmp.add_argument("--fail", action="append", metavar="METRIC:+-N[%]",
                     help="regression threshold, repeatable or comma list: a sign says which way is worse, e.g. "
                          "tokens_per_s:-5%% peak_vram_bytes:+3%% mfu:-0.02 (default: tokens_per_s:-5%%, "
                          "memory_bytes:+3%%: peak VRAM on a GPU, peak RSS on a CPU)")
    cmp.add_argument("--allow-missing", action="store_true",
                     help="list baseline cells missing from CURRENT instead of failing on them (a run of fewer cells "
                          "on purpose)")
    cmp.add_argument("--fail-missing", action="store_true", help=argparse.SUPPRESS)  # the default now
    cmp.add_argument("--across-gpus", action="store_true",
                     help="also compare a cell measured on different GPU models (default: same GPU model only)")
    cmp.add_argument("--out", help="markdown report path (default: CURRENT/compare.md)")
    rep.set_defaults(handler=cmd_report)
    cmp.set_defaults(handler=cmd_compare)


def cmd_report(ns: argparse.Namespace) -> int:
    from harness.report.build import build_report
    from harness.report.load import RunLoadError

    try:
        files = build_report(ns.run_dirs, ns.out)
    except RunLoadError as exc:
        return _error(str(exc))
    _warn(files.warnings)
    print(f"report: {files.markdown}")
    print(f"report: {files.html}")
    print(f"charts: {len(files.charts)} files in {files.out_dir / 'charts'}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from harness.report.compare import CompareError
    from harness.report.gate import check, prepare
    from harness.report.load import RunLoadError

    if len(ns.runs) < 2:
        return _error("compare needs a BASELINE and a CURRENT run folder")
    try:
        chk = prepare(ns.runs[:-1], ns.fail, allow_missing=ns.allow_missing, across_gpus=ns.across_gpus)
        out = check(chk, ns.runs[-1:], out=ns.out)
    except (CompareError, RunLoadError) as exc:
        return _error(str(exc))
    _warn(out.warnings)
    print(out.summary)
    for line in out.lines:
        print(line)
    print(f"report: {out.report}")
    return out.exit_code


# -- serial vs parallel ---------------------------------------------------------------
def add_scale_commands(sub: argparse._SubParsersAction) -> None:
    agree = sub.add_parser("agree", help="do two runs of the same cells agree (e.g. serial vs --gpus 0,1)?",
                           description="Put each cell's tokens/s and peak memory from RUN_A and RUN_B side by side "
                                       "(same cell, same GPU model), with the relative difference and a verdict, and "
                                       "both runs' cells per hour. Exit 0: every compared metric agrees, 1: some "
                                       "differ, 2: unusable input.")
    agree.add_argument("run_a", metavar="RUN_A", help="first run folder (e.g. the serial run)")
    agree.add_argument("run_b", metavar="RUN_B", help="second run folder (e.g. the parallel run)")
    agree.add_argument("--tolerance", action="append", metavar="METRIC:N%",
                       help="largest relative difference that still agrees, repeatable or comma list (default "
                            "tokens_per_s:5%%, memory_bytes:3%%, torch_peak_allocated_bytes:1%%); values inside "
                            "the other run's per-step spread agree too")
    agree.add_argument("--out", help="also write the table as markdown to this file")
    agree.set_defaults(handler=cmd_agree)


def agree_text(run_a: str, run_b: str, tolerance=None) -> tuple[str, bool]:
    """The agreement report (markdown) and whether every compared metric agrees."""
    from harness.report import agree as A
    from harness.report import cell_rate as throughput
    from harness.report.load import load_run_set
    from harness.core.fmt import markdown_table

    tol = A.parse_tolerances(tolerance)
    a, b = load_run_set([run_a]), load_run_set([run_b])
    results = A.agreement(a.records, b.records, tol)
    # a side may be several run folders (the shards of a sweep): its cells per hour are the set's
    ta, tb = throughput.of_runs([r.path for r in a.runs]), throughput.of_runs([r.path for r in b.runs])
    lines = [f"A: {_runs_label(a.runs)}; {throughput.line(ta)}", f"B: {_runs_label(b.runs)}; {throughput.line(tb)}"]
    if ta and tb and ta.get("cells_per_hour") and tb.get("cells_per_hour"):
        lines.append(f"B runs {tb['cells_per_hour'] / ta['cells_per_hour']:.2f}x the cells per hour of A")
    heads, rows = A.table(results)
    text = "\n".join(["# Do the runs agree?", "", *[f"- {x}" for x in lines], "",
                      *[f"- {x}" for x in A.summary(results, tol)], "", markdown_table(heads, rows), ""])
    return text, all(r.verdict != "differ" for r in results)


def _runs_label(runs) -> str:
    if len(runs) == 1:
        return f"{runs[0].run_id} ({runs[0].path})"
    return f"{len(runs)} run folders ({', '.join(r.run_id for r in runs)})"


def cmd_agree(ns: argparse.Namespace) -> int:
    from harness.report.agree import AgreeError
    from harness.report.load import RunLoadError

    try:
        text, ok = agree_text(ns.run_a, ns.run_b, ns.tolerance)
    except (AgreeError, RunLoadError) as exc:
        return _error(str(exc))
    print(text)
    if ns.out:
        try:
            with open(ns.out, "w") as f:
                f.write(text)
        except OSError as exc:
            return _error(f"cannot write {ns.out}: {exc.strerror or exc}")
    return 0 if ok else 1
