"""Predicted time of a cell, for balancing shards (``harness.plan.shard``). Pure module.

Two sources, best first:

1. **Earlier runs** (``--shard-history RUN_DIR[,...]``): the median ``wall_time_s`` of the
   same cell id; else a cell of the same row (same cell but for length) measured at the
   nearest length, scaled in proportion to the length. Pruned and unsupported cells
   (wall time 0) and records without a time say nothing and are passed over.
2. **A token model**, for everything else: ``(fixed + steps x seq_len x batch)`` x a
   precision factor x a checkpointing factor x the model's size (presets only; a local
   checkpoint counts as the average preset of the sweep). The factors are rough ratios
   of step time on one GPU (fp32 about twice bf16; int8's LLM.int8 matmuls about 2.5x;
   4-bit dequantisation about 1.4x; checkpointing recomputes the forward pass). Only
   ratios matter for balancing. The memory model (harness.fit.memmodel) predicts memory,
   not time, so it is not used here.

With a history, cells it does not cover take the token model scaled to seconds by the
median ratio (history seconds / token units) of the cells it does cover.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable

from harness.core.errors import SpecError
from harness.core.models import get_preset
from harness.core.spec import CellSpec
from harness.plan.prune import row_key

PRECISION_FACTOR = {"fp32": 2.0, "bf16": 1.0, "fp16": 1.0, "int8": 2.5, "nf4": 1.4, "fp4": 1.4, "nf4-dq": 1.5}
GC_FACTOR = {"off": 1.0, "on": 1.35, "offload": 1.6}
# Per-cell fixed cost (model load, worker fork, warm-up of kernels) as token-steps.
FIXED_TOKEN_STEPS = 16384


def preset_params(model: str) -> float | None:
    """Approximate parameter count of a preset from its config (None: not a preset)."""
    try:
        cfg = get_preset(model).get("config") or {}
    except SpecError:
        return None
    cfg = cfg.get("text_config", cfg)
    h, n, i, v = (cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    if not all(isinstance(x, int) and x > 0 for x in (h, n, i, v)):
        return None
    return float(n * (4 * h * h + 3 * h * i) + 2 * v * h)


def token_model(cells: Iterable[CellSpec]) -> Callable[[CellSpec], float]:
    """The token model over the sweep's cells (the model scale needs the whole sweep)."""
    sizes = {m: preset_params(m) for m in {c.model for c in cells}}
    known = [s for s in sizes.values() if s]
    ref = statistics.median(known) if known else 1.0  # a local checkpoint counts as this

    def cost(cell: CellSpec) -> float:
        steps = cell.warmup_steps + cell.max_measured_steps
        tokens = FIXED_TOKEN_STEPS + steps * cell.seq_len * cell.batch_size
        size = (sizes.get(cell.model) or ref) / ref
        return tokens * PRECISION_FACTOR.get(cell.precision, 1.0) * GC_FACTOR.get(cell.grad_ckpt, 1.0) * size

    return cost


class History:
    """Measured wall times of earlier runs, by cell id and by row."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        by_cell: dict[str, list[float]] = {}
        by_row: dict[str, dict[int, list[float]]] = {}
        for rec in records:
            t = rec.get("wall_time_s")
            if not isinstance(t, (int, float)) or not t > 0 or rec.get("pruned") or not rec.get("cell_id"):
                continue
            by_cell.setdefault(rec["cell_id"], []).append(float(t))
            try:
                spec = CellSpec.from_dict(rec["spec"])
            except Exception:  # a record of another schema still prices its own id
                continue
            by_row.setdefault(row_key(spec).cell_id, {}).setdefault(spec.seq_len, []).append(float(t))
        self.cells = {k: statistics.median(v) for k, v in by_cell.items()}
        self.rows = {k: {n: statistics.median(v) for n, v in lens.items()} for k, lens in by_row.items()}

    def __bool__(self) -> bool:
        return bool(self.cells)

    def seconds(self, cell: CellSpec) -> float | None:
        if cell.cell_id in self.cells:
            return self.cells[cell.cell_id]
        lens = self.rows.get(row_key(cell).cell_id)
        if not lens:
            return None
        # nearest length on a log scale, the shorter one on a tie
        near = min(lens, key=lambda n: (abs(math.log(cell.seq_len / n)), n))
        return lens[near] * cell.seq_len / near


def estimator(cells: list[CellSpec], history: History | None) -> tuple[Callable[[CellSpec], float], str]:
    """The estimate for the split and a short description of its basis."""
    tokens = token_model(cells)
    if history is None:
        return tokens, "tokens (seq_len x batch x steps, precision, checkpointing, model size)"
    known = {c.cell_id: history.seconds(c) for c in cells}
    pairs = sorted(known[c.cell_id] / tokens(c) for c in cells if known[c.cell_id])
    if not pairs:
        return tokens, "tokens (no cell of --shard-history matches this sweep)"
    scale = statistics.median(pairs)
    n_known = len(pairs)

    def cost(cell: CellSpec) -> float:
        t = known.get(cell.cell_id)
        return t if t else tokens(cell) * scale

    rest = len(cells) - n_known
    return cost, (f"history ({n_known} of {len(cells)} cells from earlier runs"
                  + (f", {rest} from the token model scaled to seconds)" if rest else ")"))
