"""The GPU work queue: the measurements still owed on a GPU host, in order, resumable across
calls of a few minutes each.

    scripts/gpu-host.sh reports/runs/queue -- python3 scripts/gpu_queue.py --root reports/runs/queue --time-limit 540
    (carry .whl; from the second call on also carry reports/runs/queue)

Each step has its own folder under ``--root``, a command that continues whatever the
folder already holds (``--resume`` runs, drivers that keep what they measured), a test
of whether it is done, and a line saying how far it got. A call runs the first
unfinished step with the time left (every step stops starting new cells or rounds before
its limit, so a call ends between cells), then the next, until the time is up; it ends
with a table of every step: done, how far, or not started. ``--status`` prints that
table without running anything (no GPU needed). ``--only STEP`` runs one step.

Time on the GPU host is scarce and uneven (some days 30 minutes, some none; a failed
start costs minutes): the queue is what a session runs first whenever it gets a machine.
The order is the trust work's: the noise-robust overhead first (harness vs bare loop,
sampler cost), then the memory diagnostics (offload vs plain checkpointing, int8 with
checkpointing), then the default matrix reference and its full-length rows, then the fit
answers at 16 / 24 / 40 / 80 GiB with the cap at 65,536 tokens (after the offload and
memory-model fixes have landed), then the training-stack cells (``stacks``: needs the
stacks' wheels carried too, docs/gpu-host.md "Training stacks").

Imports no torch (the steps' own processes do); ``--status`` works anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
MODEL = "llama-3.1-8b"
END_MARGIN_S = 15  # kept free at the end of a call for the status table and the tar
OVERRUN_S = 30  # a step past its own limit by this much is stopped, with everything it started


@dataclass
class Step:
    name: str
    what: str
    command: Callable[[Path, float], list[str]]  # (step folder, seconds it may take) -> argv
    progress: Callable[[Path], tuple[bool, str]]  # step folder -> (done, how far)
    min_s: float  # below this much time left the step is not started
    env: dict[str, str] = field(default_factory=dict)


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(run_dir: Path) -> list[dict]:
    from harness.core.store import load_records

    path = run_dir / "results.jsonl"
    return load_records(path) if path.is_file() else []


# -- the steps -----------------------------------------------------------------------------

OVERHEAD_CELLS = "bf16/s2048/gc-off,bf16/s2048/gc-on,nf4/s2048/gc-on"


def _overhead_cmd(d: Path, budget: float) -> list[str]:
    return [PY, "benchmarks/interleaved.py", "--out", str(d), "--model", MODEL, "--cells", OVERHEAD_CELLS,
            "--time-limit", f"{budget:.0f}"]


def _overhead_settled(cell: dict, planned: int) -> str | None:
    """Why a cell of the interleaved driver needs no more rounds, or None.

    The driver starts over on each call, so "settled" cannot wait for the planned rounds
    (about 85 fit in one call): a cell is settled when every comparison is decided, when
    the undecided ones would need more rounds than planned (their verdict stays "cannot
    tell" at the noise measured), or when a side ran out of memory (it will again on the
    same card: the cell is owed on a larger one)."""
    sides = cell.get("sides") or {}
    if any(s.get("status") == "oom" for s in sides.values()):
        return "a side ran out of memory on this card"
    if not cell.get("rounds") or any(s.get("status") != "ok" for s in sides.values()):
        return None
    if cell["rounds"] >= planned:
        return "planned rounds"
    comps = [c for c in (cell.get("comparisons") or {}).values() if isinstance(c, dict)]
    open_ = [c for c in comps if c.get("verdict") not in ("met", "missed")]
    if not open_:
        return "decided"
    if all((c.get("rounds_to_decide") or 0) > planned for c in open_):
        return "the rest cannot be told within the planned rounds"
    return None


def _overhead_progress(d: Path) -> tuple[bool, str]:
    data = _json(d / "interleaved.json")
    if not isinstance(data, dict):
        return False, "not started"
    planned = int((data.get("settings") or {}).get("rounds") or 200)
    cells = {c.get("cell"): c for c in data.get("cells") or [] if isinstance(c, dict)}
    want = OVERHEAD_CELLS.split(",")
    why = {name: _overhead_settled(cells[name], planned) for name in want if name in cells}
    settled = [n for n in want if why.get(n)]
    oom = [n for n in settled if why[n].startswith("a side ran out")]
    note = f" ({', '.join(oom)}: a side ran out of memory on this card; owed on a larger one)" if oom else ""
    return len(settled) == len(want), f"{len(settled)} of {len(want)} cells settled{note}"


def _diag_cmd(script: str, precisions: str) -> Callable[[Path, float], list[str]]:
    def cmd(d: Path, budget: float) -> list[str]:
        return [PY, f"benchmarks/{script}", "--out", str(d), "--model", MODEL, "--seq-len", "8192",
                "--precisions", precisions, "--time-limit", f"{budget:.0f}"]
    return cmd


def _diag_progress(name: str, precisions: str) -> Callable[[Path], tuple[bool, str]]:
    def progress(d: Path) -> tuple[bool, str]:
        data = _json(d / f"{name}.json")
        if not isinstance(data, dict):
            return False, "not started"
        done = {str(r.get("precision")) for r in data.get("rows") or data.get("cells") or [] if r.get("status")}
        want = set(precisions.split(","))
        return want <= done, f"{len(want & done)} of {len(want)} precisions measured"
    return progress


def _expected_cells(spec: list[dict]) -> set[str]:
    from harness.plan.options import build_config

    gpu = {"has_gpu": True}
    return {c.cell_id for values in spec for c in build_config(values, gpu).cells}


REFERENCE = [{"model": MODEL, "matrix": "default"},
             {"model": MODEL, "matrix": "full", "precision": "bf16,nf4"}]


def _reference_cmd(d: Path, budget: float) -> list[str]:
    return ["bash", "scripts/h200-reference.sh"]


def _reference_progress(d: Path) -> tuple[bool, str]:
    want = _expected_cells(REFERENCE)
    have = {r.get("cell_id") for r in _records(d)}
    if not have:
        return False, "not started"
    return not (want - have), f"{len(want & have)} of {len(want)} cells recorded"


FIT_BUDGETS = "16,24,40,80"
FIT_ROWS = {"precision": "bf16,nf4", "grad_ckpt": "on,offload"}


def _fit_cmd(d: Path, budget: float) -> list[str]:
    return [PY, "-m", "pytest", "suites/test_fit.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "-q",
            "--run-dir", str(d), "--resume", "--model", MODEL, "--precision", FIT_ROWS["precision"],
            "--grad-ckpt", FIT_ROWS["grad_ckpt"], "--budgets", FIT_BUDGETS, "--granularity", "256",
            "--max-seq-len", "65536", "--time-limit", f"{max(1.0, budget - 60):.0f}",
            "--prior", "reports/reference/h200-core-2026-11-29"]


def _fit_progress(d: Path) -> tuple[bool, str]:
    data = _json(d / "fit.json")
    if not isinstance(data, dict):
        return False, "not started"
    answers = [a for r in data.get("rows") or [] for a in r.get("answers") or []]
    want = len(FIT_BUDGETS.split(",")) * len(FIT_ROWS["precision"].split(",")) * len(FIT_ROWS["grad_ckpt"].split(","))
    measured = [a for a in answers if isinstance(a, dict) and a.get("status") in ("found", "oom", "at_cap")]
    return len(measured) >= want, f"{len(measured)} of {want} answers measured"


# The training stacks on the same cells: plain transformers + peft, Liger, Unsloth. 4-bit is
# nf4-dq for all three (Unsloth's 4-bit loader always double-quantises; hf and Liger load
# the same quantisation), so the rows compare stacks, not quantisations.
STACKS = "hf,liger,unsloth"
STACK_CELLS = {"model": MODEL, "precision": "bf16,nf4-dq", "seq_len": "2048,8192", "grad_ckpt": "on",
               "stack": STACKS}
STACK_FIT_BUDGETS = "24,40"
# An 8B stack cell takes 10-15 s on an H100; Unsloth's first step did not end within 7
# minutes there (docs/gpu-host.md): a bounded cell is recorded as a timeout with its log's
# tail, and a resumed call goes on to the next cell instead of hanging on it again.
STACK_CELL_TIMEOUT_S = 240


def _stacks_cmd(d: Path, budget: float) -> list[str]:
    """The cells first (their folder ``cells``), then the fit answers (``fit``) with the time left."""
    import shlex

    c = STACK_CELLS
    cells = [PY, "-m", "pytest", "suites/test_matrix.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "-q",
             "--run-dir", str(d / "cells"), "--resume", "--model", MODEL, "--precision", c["precision"],
             "--seq-len", c["seq_len"], "--grad-ckpt", c["grad_ckpt"], "--stack", STACKS,
             "--cell-timeout", str(STACK_CELL_TIMEOUT_S)]
    fit = [PY, "-m", "pytest", "suites/test_fit.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "-q",
           "--run-dir", str(d / "fit"), "--resume", "--model", MODEL, "--precision", c["precision"],
           "--grad-ckpt", c["grad_ckpt"], "--stack", STACKS, "--budgets", STACK_FIT_BUDGETS, "--granularity", "256",
           "--max-seq-len", "65536"]
    total = f"{max(1.0, budget - 30):.0f}"
    # the fit's memory model starts from the stack cells just measured (--prior)
    prior = shlex.quote(str(d / "cells"))
    script = (f'start=$SECONDS; {shlex.join(cells)} --time-limit {total}; '
              f'left=$(( {total} - (SECONDS - start) - 30 )); prior=""; '
              f'[ -f {prior}/results.jsonl ] && prior="--prior {prior}"; '
              f'if [ "$left" -ge 120 ]; then {shlex.join(fit)} $prior --time-limit "$left"; fi')
    return ["bash", "-c", script]


def _stacks_progress(d: Path) -> tuple[bool, str]:
    """Done when every cell is recorded with an outcome other than unsupported (a host without
    the stacks' wheels records them unsupported: they count as not measured) and every fit
    answer is measured."""
    want = _expected_cells([STACK_CELLS])
    recs = _records(d / "cells")
    have = {r.get("cell_id") for r in recs if r.get("status") != "unsupported"}
    unsupported = {r.get("cell_id") for r in recs if r.get("status") == "unsupported"} - have
    data = _json(d / "fit" / "fit.json")
    answers = [a for r in (data or {}).get("rows") or [] for a in r.get("answers") or []] \
        if isinstance(data, dict) else []
    measured = [a for a in answers if isinstance(a, dict) and a.get("status") in ("found", "oom", "at_cap")]
    n_fit = len(STACK_FIT_BUDGETS.split(",")) * len(STACK_CELLS["precision"].split(",")) * len(STACKS.split(","))
    if not recs and not measured:
        return False, "not started"
    note = f" ({len(unsupported)} unsupported: were the stacks' wheels carried?)" if unsupported else ""
    return not (want - have) and len(measured) >= n_fit, \
        f"{len(want & have)} of {len(want)} cells measured{note}, {len(measured)} of {n_fit} fit answers measured"


STEPS: tuple[Step, ...] = (
    Step("overhead", "harness vs bare loop and sampler on vs off, interleaved paired rounds (8B, 2048 tokens)",
         _overhead_cmd, _overhead_progress, min_s=150),
    Step("offload-memory", "reserved vs allocated of gc-on and the offload variants (8B, 8192 tokens)",
         _diag_cmd("offload_memory.py", "bf16,nf4"), _diag_progress("offload_memory", "bf16,nf4"), min_s=90),
    Step("int8-memory", "where int8 with checkpointing keeps its memory (allocator snapshot, 8B, 8192 tokens)",
         _diag_cmd("int8_memory.py", "int8,bf16"), _diag_progress("int8_memory", "int8,bf16"), min_s=90),
    Step("reference", "the default matrix of the 8B preset, then the full-length bf16 / nf4 rows",
         _reference_cmd, _reference_progress, min_s=120),
    Step("fit", "longest context at 16 / 24 / 40 / 80 GiB, cap 65,536 (bf16, nf4 x gc-on, offload)",
         _fit_cmd, _fit_progress, min_s=120),
    Step("stacks", "hf, Liger and Unsloth on the same 8B cells (bf16, nf4-dq x 2048, 8192 tokens, gc-on), then "
         "their longest context at 24 / 40 GiB", _stacks_cmd, _stacks_progress, min_s=150),
)


# -- running -------------------------------------------------------------------------------

def status_rows(root: Path) -> list[tuple[str, str, str]]:
    rows = []
    for step in STEPS:
        done, how = step.progress(root / step.name)
        rows.append((step.name, "done" if done else ("not started" if how == "not started" else "partial"), how))
    return rows


def status_markdown(root: Path) -> str:
    lines = ["| step | state | how far |", "|---|---|---|"]
    lines += [f"| {n} | {s} | {h} |" for n, s, h in status_rows(root)]
    left = [n for n, s, _ in status_rows(root) if s != "done"]
    lines += ["", "nothing left" if not left else f"left: {', '.join(left)}"]
    return "\n".join(lines) + "\n"


def run_step(step: Step, root: Path, seconds: float) -> int:
    d = root / step.name
    d.mkdir(parents=True, exist_ok=True)
    argv = step.command(d, seconds)
    env = dict(os.environ, **step.env)
    if step.name == "reference":  # the reference script reads its folder and limit from the environment
        env.update({"RUN": str(d), "MODEL": MODEL, "LIMIT": f"{seconds:.0f}"})
    print(f"gpu-queue: {step.name}: {step.what}; up to {seconds:.0f} s: {' '.join(argv)}", flush=True)
    with open(d / "queue.log", "a") as log:
        # its own process group: at the limit the whole step goes (pytest, its worker server and
        # the cell), not only the shell that started it, so no orphan keeps the GPU busy
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=seconds + OVERRUN_S)
        except subprocess.TimeoutExpired:
            print(f"gpu-queue: {step.name}: stopped at its limit", flush=True)
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            return 124


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="reports/runs/queue", help="folder of the steps' folders (carry it back)")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds this call may run")
    ap.add_argument("--status", action="store_true", help="print what is done and left; run nothing")
    ap.add_argument("--only", help="run this step only")
    ns = ap.parse_args(argv)
    root = Path(ns.root)
    names = [s.name for s in STEPS]
    if ns.only and ns.only not in names:
        print(f"gpu-queue: error: unknown step {ns.only!r}; steps: {', '.join(names)}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + ns.time_limit - END_MARGIN_S
    if not ns.status:
        root.mkdir(parents=True, exist_ok=True)
        for step in STEPS:
            if ns.only and step.name != ns.only:
                continue
            done, how = step.progress(root / step.name)
            if done:
                continue
            left = deadline - time.monotonic()
            if left < step.min_s:
                print(f"gpu-queue: {step.name} needs at least {step.min_s:.0f} s; {left:.0f} s left: stopping here")
                break
            run_step(step, root, left)
            done, how = step.progress(root / step.name)
            print(f"gpu-queue: {step.name}: {'done' if done else how}", flush=True)
            if not done:
                break  # out of time inside the step: the next call continues it
    text = status_markdown(root)
    if root.is_dir():
        (root / "queue-status.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
