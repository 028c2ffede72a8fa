"""Shared by benchmarks/overhead.py and benchmarks/repeatability.py: cells from short
names, and a harness Sweep (the harness's normal path: one worker server, one fresh
forked process per cell, records in a run folder) to run them."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.core import host as env_mod  # noqa: E402
from harness.plan.options import build_config  # noqa: E402
from harness.core.spec import CellSpec  # noqa: E402
from harness.core.errors import SpecError

CELL_RE = re.compile(r"^(?P<precision>[a-z0-9-]+)/s(?P<seq>\d+)/gc-(?P<gc>off|on|offload)$")
# the overhead and repeatability cells: the Llama-3.1-8B preset at 2048 tokens
DEFAULT_CELLS = "bf16/s2048/gc-off,bf16/s2048/gc-on,nf4/s2048/gc-on"


def parse_cells(text: str) -> list[tuple[str, int, str]]:
    """'bf16/s2048/gc-off,nf4/s2048/gc-on' -> [(precision, seq_len, grad_ckpt), ...]."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        m = CELL_RE.match(item)
        if not m:
            raise SpecError(f"cell {item!r}: write PRECISION/sLENGTH/gc-MODE, e.g. bf16/s2048/gc-on")
        out.append((m["precision"], int(m["seq"]), m["gc"]))
    if not out:
        raise SpecError("no cells given")
    return out


def sweep_config(*, model: str, cells: list[tuple[str, int, str]], run_dir: Path, steps: int, warmup_steps: int,
                 device: str, cache_dir: str | None, cell_timeout: float | None, nvml_period_ms: float | None = None,
                 facts: dict[str, Any] | None = None):
    """The harness's own option handling for these cells (so they are the cells a
    ``lora-harness run`` with the same options would run)."""
    facts = facts if facts is not None else env_mod.quick_facts()
    values = {"model": model, "precision": ",".join(sorted({c[0] for c in cells})),
              "seq_len": ",".join(str(s) for s in sorted({c[1] for c in cells})),
              "grad_ckpt": ",".join(sorted({c[2] for c in cells})), "steps": str(steps), "warmup_steps": warmup_steps,
              "device": device, "run_dir": str(run_dir), "cache_dir": cache_dir, "cell_timeout": cell_timeout,
              "nvml_period_ms": nvml_period_ms}
    cfg = build_config(values, facts)
    by_axes = {(c.precision, c.seq_len, c.grad_ckpt): c for c in cfg.cells}
    chosen = [by_axes[c] for c in cells]
    return dataclasses.replace(cfg, cells=tuple(chosen)), facts


def short_name(cell: CellSpec) -> str:
    return f"{cell.precision}/s{cell.seq_len}/gc-{cell.grad_ckpt}"


def write_outputs(out: Path, stem: str, data: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown)


class Deadline:
    """``--time-limit``: start nothing new after this many seconds (what ran is reported)."""

    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def passed(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.t0 >= self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def ensure_checkpoints(runner, cells, cache_dir: str | None, device: str, log_dir: Path) -> dict[str, Path]:
    """The synthetic checkpoint of every model whose cells load one (quantised cells), written
    once through the worker server ``runner`` (a fork-server runner, or a sweep's launcher:
    anything with ``run_job``); {model: folder}. SystemExit when it fails."""
    from harness.core.models import get_preset
    from harness.cell.build import checkpoint_dir

    out: dict[str, Path] = {}
    for cell in cells:
        if cell.resolved_load() != "pretrained" or cell.model in out:
            continue
        log = Path(log_dir) / "checkpoint.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        job = runner.run_job("harness.cell.build:ensure_checkpoint_job",
                             {"model": cell.model, "cache_dir": cache_dir, "device": device}, timeout_s=900,
                             log_path=log)
        if not job.result or job.result.get("status") != "ok":
            raise SystemExit(f"could not write the synthetic checkpoint of {cell.model}: see {log}")
        out[cell.model] = checkpoint_dir(get_preset(cell.model), cache_dir)
    return out
