"""The harness's overhead and the NVML sampler's cost, measured by interleaved paired rounds.

Why not ``benchmarks/overhead.py``: there, bare and harness runs follow one another, and
on the H200 host the same cell's tokens/s spread 15-56% from one process to the next
(the host CPU, which launches thousands of small kernels a step, wanders), so ratios of
0.93 / 0.89 / 1.02 could not be told from noise. Here, per cell, three training
processes are alive at once, each with its own model on the device (bf16 gc-off at
2048 tokens: ~35 GB each, three fit an H200; on an 80 GB card use ``--no-sampler-off``):

- ``bare``: ``benchmarks/bare_lora.py --gate ...`` (a fresh interpreter);
- ``harness``: the cell through the harness's normal path (a ``harness.run.sweep.Sweep``:
  a forked worker process, the record in ``harness-run/``), NVML sampler on;
- ``harness-nvml-off``: the same through a second Sweep with the sampler off
  (``harness-nvml-off-run/``);

and they take turns at step gates (``harness/trackers/gate.py``): warm-up steps in turn,
then rounds; in round r each side runs ``--steps-per-turn`` (k) steps while the others
wait, in an order that alternates between rounds (``protocol.schedule``, ABBA-style,
so no side always goes first). Waiting is outside every step timer; while the
harness waits its sampler thread is paused, so it polls during its own steps only.
After the rounds each side runs one step under the GPU-busy profiler
(``harness/trackers/gpu_busy.py``; None with a reason off CUDA), then is told to stop.

Per cell, with ``benchmarks/protocol.py`` (Student t on per-round log ratios, 95%):
harness vs bare tokens/s (target ratio >= 0.97), sampler on vs off (cost < 1%), and
torch peak allocated harness vs bare (within 1%; one exact figure per side, ``n/a`` on
a CPU). Also the losses (the same tokens and weights: identical on the CPU), every
step's report (``t0``/``t1``: the turns never overlap), NVML utilisation per side.

Output in ``--out``: ``interleaved.md``, ``interleaved.json``, ``bare/`` (JSON and logs
of the bare loops), ``harness-run/``, ``harness-nvml-off-run/``.

``--time-limit``: the limit's time is shared among the cells not yet run; a cell starts
no new round once its share is used (its tables hold the rounds measured), and no cell
starts after the limit.

Time on one H200 (Llama-3.1-8B preset, 2048 tokens, k = 2): two worker servers side by
side ~22 s, the synthetic checkpoint once per machine ~25 s (nf4), per cell ~20 s of
start (the bare interpreter's imports; the harness cells load meanwhile), 3 warm-up
turns each, rounds of 3 x 2 steps (~1.3 s bf16 gc-off, ~2.2 s gc-on, ~2.8 s nf4 gc-on),
~5 s to stop; in 240 s ~20-30 rounds of each of the three cells.

    python benchmarks/interleaved.py --out reports/runs/h200-diag/interleaved --time-limit 240
    python benchmarks/interleaved.py --model tiny-llama --cells bf16/s64/gc-off --rounds 6 --device cpu \\
        --out /tmp/interleaved                                                   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from interleaved_report import analyse_cell, markdown  # noqa: E402
from perfcommon import (DEFAULT_CELLS, ROOT, Deadline, ensure_checkpoints, parse_cells, short_name,  # noqa: E402
                        sweep_config, write_outputs)

from harness.plan.options import SweepConfig  # noqa: E402
from harness.run.sweep import Sweep  # noqa: E402
from harness.cell.trackers.gate import GateError, DriverGate, make_fifos  # noqa: E402
from harness.cell.trackers.gpu_busy import NvmlUtilLog  # noqa: E402

SIDES = ("bare", "harness", "harness-nvml-off")


@dataclasses.dataclass(frozen=True)
class GatedConfig(SweepConfig):
    """A sweep whose cells take turns at a step gate (``opts["step_gate"]``)."""

    step_gate: tuple[str, ...] = ()

    def worker_opts(self) -> dict[str, Any]:
        opts = super().worker_opts()
        if self.step_gate:
            opts["step_gate"] = list(self.step_gate)
        return opts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--cells", default=DEFAULT_CELLS, help=f"comma list of PRECISION/sLENGTH/gc-MODE (default {DEFAULT_CELLS})")
    p.add_argument("--rounds", type=int, default=200, help="most rounds per cell (the time limit may stop earlier)")
    p.add_argument("--steps-per-turn", type=int, default=2, help="k: steps a side runs per turn")
    p.add_argument("--warmup-steps", type=int, default=3, help="warm-up steps of each side, taken in turn")
    p.add_argument("--order", default="abba", choices=["abba", "alternate"], help="order of the sides per round")
    p.add_argument("--no-sampler-off", action="store_true", help="only bare and harness (no sampler-off side)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--cache-dir", default=None, help="synthetic checkpoints (default: the harness's)")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds for every side to reach its gate")
    p.add_argument("--step-timeout", type=float, default=300, help="seconds for one step's report")
    p.add_argument("--time-limit", type=float, default=None, help="start no new round / cell after this many seconds")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps_per_turn < 1 or a.warmup_steps < 0:
        p.error("--rounds and --steps-per-turn must be >= 1, --warmup-steps >= 0")
    return a


class Side:
    """The driver's view of one training process."""

    def __init__(self, name: str, gate: DriverGate) -> None:
        self.name, self.gate = name, gate
        self.alive = lambda: True
        self.ended = False
        self.busy: dict[str, Any] | None = None
        self.proc: subprocess.Popen | None = None
        self.json_path: Path | None = None
        self.thread: threading.Thread | None = None
        self.holder: dict[str, Any] = {}

    def ask(self, cmd: str, timeout_s: float) -> dict[str, Any]:
        self.gate.send(cmd)
        msg = self.gate.recv(timeout_s, self.alive)
        if msg.get("event") == "end":
            self.ended = True
            raise GateError(f"{self.name}: the side ended its loop before the driver said stop")
        return msg


def _start_bare(a, cell, side: Side, out: Path, checkpoint: Path | None) -> None:
    name = short_name(cell).replace("/", "_")
    side.json_path = out / "bare" / f"{name}.json"
    side.json_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_lora.py"), "--model", cell.model, "--precision",
           cell.precision, "--seq-len", str(cell.seq_len), "--batch-size", str(cell.batch_size), "--grad-ckpt",
           cell.grad_ckpt, "--warmup-steps", str(cell.warmup_steps), "--steps", str(cell.steps), "--lora-rank",
           str(cell.lora.rank), "--lora-alpha", str(cell.lora.alpha), "--lora-dropout", str(cell.lora.dropout),
           "--lr", str(cell.lr), "--seed", str(cell.seed), "--device", a.device, "--json-out", str(side.json_path),
           "--gate", f"{side.gate.go_path},{side.gate.done_path}"]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    # the environment a harness worker gets (harness/cell/server.py sets these for its children)
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    with open(out / "bare" / f"{name}.log", "w") as log:
        side.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    side.alive = lambda: side.proc.poll() is None


def _start_harness(sweep: Sweep, cell, side: Side, tag: str) -> None:
    sweep.config = dataclasses.replace(sweep.config, step_gate=(side.gate.go_path, side.gate.done_path))

    def body():
        try:
            side.holder["record"] = sweep.run(cell.replace(tag=tag))
        except BaseException as exc:  # noqa: BLE001 - reported with the cell
            side.holder["error"] = f"{type(exc).__name__}: {exc}"

    side.thread = threading.Thread(target=body, name=f"sweep-{side.name}", daemon=True)
    side.thread.start()
    side.alive = side.thread.is_alive


def _connect(sides: dict[str, Side], timeout_s: float) -> None:
    """Wait until every side is at its gate (models loaded) and has said ready."""
    deadline = time.monotonic() + timeout_s
    pending = dict(sides)
    while pending:
        for name, side in list(pending.items()):
            if side.gate.try_connect():
                msg = side.gate.recv(max(1.0, deadline - time.monotonic()), side.alive)
                if msg.get("event") != "ready":
                    raise GateError(f"{name}: expected ready, got {msg}")
                del pending[name]
            elif not side.alive():
                raise GateError(f"{name}: the side ended before it reached its gate")
        if pending and time.monotonic() > deadline:
            raise GateError(f"{', '.join(pending)}: not at the gate after {timeout_s:g} s")
        time.sleep(0.01)


def _turns(a, sides: dict[str, Side], cell_end: float | None, nvml: NvmlUtilLog, state: dict[str, Any]) -> None:
    """Warm-up turns, then the rounds, then one profiled step each; fills ``state``."""
    names = list(sides)
    for w in range(a.warmup_steps):
        for name in protocol.schedule(w + 1, names, a.order)[w]:
            state["reports"].append(dict(sides[name].ask("go", a.step_timeout), side=name, phase="warmup"))
    nvml.poll()
    last_round = 0.0
    for r, order in enumerate(protocol.schedule(a.rounds, names, a.order)):
        if cell_end is not None and time.monotonic() + last_round > cell_end:
            state["stopped"] = "time limit"
            break
        t0, entry = time.monotonic(), {"round": r, "order": list(order), "times": {}}
        for name in order:
            for j in range(a.steps_per_turn):
                msg = sides[name].ask("go", a.step_timeout)
                entry["times"].setdefault(name, []).append(msg["dt"])
                state["reports"].append(dict(msg, side=name, phase="round", round=r, pos=j))
        state["rounds"].append(entry)
        nvml.poll()
        last_round = time.monotonic() - t0
    for name in names:
        msg = sides[name].ask("profile", a.step_timeout)
        sides[name].busy = msg.get("busy")
        state["reports"].append(dict(msg, side=name, phase="profile"))


def _stop(sides: dict[str, Side], a) -> None:
    """Tell every side still alive to stop (one still loading once it reaches its gate);
    wait for its last word."""
    for side in sides.values():
        if side.ended or not side.alive():
            continue
        try:
            if not side.gate.connected:
                _connect({side.name: side}, a.start_timeout)
            side.gate.send("stop")
            while side.gate.recv(a.step_timeout, side.alive).get("event") != "end":
                pass
            side.ended = True
        except GateError as exc:
            print(f"[interleaved] {side.name}: {exc}", file=sys.stderr, flush=True)


def _collect(side: Side, timeout_s: float) -> dict[str, Any]:
    """The side's own result: the bare loop's JSON or the harness record."""
    if side.proc is None and side.thread is None:
        return {"status": "error", "error": "not started"}
    if side.proc is not None:
        try:
            side.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            side.proc.kill()
            side.proc.wait()
        if side.proc.returncode == 0 and side.json_path and side.json_path.is_file():
            return dict(json.loads(side.json_path.read_text()), status="ok")
        return {"status": "error", "error": f"bare_lora.py exited {side.proc.returncode} (see bare/*.log)"}
    side.thread.join(timeout=timeout_s)
    if side.thread.is_alive():
        return {"status": "error", "error": "the harness cell did not end"}
    return side.holder.get("record") or {"status": "error", "error": side.holder.get("error", "no record")}


def run_one(a, cell, sweeps: dict[str, Sweep], checkpoint, out: Path, cell_end, nvml_index) -> dict[str, Any]:
    """One cell: start the sides, take turns, stop them, analyse."""
    tmp = tempfile.mkdtemp(prefix="lh-gates-")
    sides = {name: Side(name, DriverGate(name, *make_fifos(tmp, name))) for name in ["bare", *sweeps]}
    state: dict[str, Any] = {"reports": [], "rounds": [], "stopped": None, "error": None}
    nvml = NvmlUtilLog(nvml_index)
    try:
        _start_bare(a, cell, sides["bare"], out, checkpoint)
        for name, sweep in sweeps.items():
            _start_harness(sweep, cell, sides[name], "interleaved" + name[len("harness"):])
        _connect(sides, a.start_timeout)
        print(f"[interleaved] {short_name(cell)}: every side at its gate", flush=True)
        _turns(a, sides, cell_end, nvml, state)
    except GateError as exc:
        state["error"] = str(exc)
        print(f"[interleaved] {short_name(cell)}: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # the job's hard stop: stop the sides, keep what was measured
        state["error"] = state["interrupted"] = "interrupted"
    finally:
        _stop(sides, a)
        results = {name: _collect(side, 600) for name, side in sides.items()}
        for side in sides.values():
            side.gate.close()
        shutil.rmtree(tmp, ignore_errors=True)
    windows = {name: [(r["w0"], r["w1"]) for r in state["reports"] if r["side"] == name and r["phase"] == "round"]
               for name in sides}
    nvml_busy = {name: nvml.busy(w) for name, w in windows.items()}
    nvml.close()
    out = analyse_cell(short_name(cell), cell.tokens_per_step, a, state, results,
                       {n: s.busy for n, s in sides.items()}, nvml_busy)
    return dict(out, interrupted=bool(state.get("interrupted")))


def _sweeps(a, out: Path, cfg, facts, command: str) -> dict[str, Sweep]:
    """One Sweep (worker server, run folder) per harness side, started side by side."""
    timeout = (a.time_limit or 3600) + a.start_timeout + 600  # a gated cell lives as long as its rounds
    base = GatedConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    base = dataclasses.replace(base, prune=False, cell_timeout_s=timeout)
    names = ["harness"] + ([] if a.no_sampler_off else ["harness-nvml-off"])
    sweeps = {}
    for name in names:
        c = dataclasses.replace(base, run_dir=str(out / f"{name}-run"),
                                nvml_period_s=0.0 if name == "harness-nvml-off" else cfg.nvml_period_s)
        sweeps[name] = Sweep(c, facts, command=command, total=len(cfg.cells))
    threads = [threading.Thread(target=s.start) for s in sweeps.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sweeps


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(a.time_limit)
    steps = a.rounds * a.steps_per_turn + 2  # + the profiled step + one never run (the stop arrives before it)
    cfg, facts = sweep_config(model=a.model, cells=parse_cells(a.cells), run_dir=out / "harness-run", steps=steps,
                              warmup_steps=a.warmup_steps, device=a.device, cache_dir=a.cache_dir, cell_timeout=None)
    command = "benchmarks/interleaved.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sweeps = _sweeps(a, out, cfg, facts, command)
    nvml_index = None
    if facts.get("has_gpu") and a.device != "cpu":
        from harness.cell.trackers.memory import nvml_index_for_visible_device

        nvml_index = nvml_index_for_visible_device(0)
    cells: list[dict[str, Any]] = []
    try:
        checkpoints = ensure_checkpoints(sweeps["harness"].launcher, cfg.cells, cfg.cache_dir, cfg.device,
                                         out / "harness-run" / "logs")
        for i, cell in enumerate(cfg.cells):
            if deadline.passed():
                cells.append({"cell": short_name(cell), "skipped": "time limit reached before the cell started"})
                continue
            cell_end = None
            if a.time_limit is not None:
                share = (a.time_limit - deadline.elapsed()) / (len(cfg.cells) - i)
                cell_end = time.monotonic() + share - 5.0  # the stop and the records take a few seconds
            print(f"[interleaved] {short_name(cell)}: starting {', '.join(['bare', *sweeps])}", flush=True)
            cells.append(run_one(a, cell, sweeps, checkpoints.get(cell.model), out, cell_end, nvml_index))
            if cells[-1]["interrupted"]:
                break
    except KeyboardInterrupt:
        cells.append({"cell": "-", "skipped": "interrupted"})
    finally:
        for s in sweeps.values():
            s.close()
    env = sweeps["harness"].env or {}
    host = (f"{env.get('gpu_name') or 'CPU'}; torch {(env.get('packages') or {}).get('torch')}; {a.model}; "
            f"{a.warmup_steps} warm-up steps, up to {a.rounds} rounds of {a.steps_per_turn} steps per side, "
            f"order {a.order}" + (f"; time limit {a.time_limit:g} s" if a.time_limit else "")
            + ("; interrupted" if any(c.get("interrupted") or c.get("skipped") == "interrupted" for c in cells) else ""))
    data = {"host": host, "elapsed_s": deadline.elapsed(), "settings": vars(a), "cells": cells,
            "env": {k: env.get(k) for k in ("hostname", "gpu_name", "worker_mode", "worker_start_s")}}
    md = markdown(data)
    write_outputs(out, "interleaved", data, md)
    print(md)
    bad = [c["cell"] for c in cells if c.get("error") or any(s.get("status") != "ok" for s in c.get("sides", {}).values())]
    for c in bad:
        print(f"[interleaved] {c}: incomplete (see interleaved.md)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
