"""Axes -> cells. Named presets and comma-list parsing. Pure module.

Presets (``--matrix``):
- ``smoke``: every precision x two short lengths x every checkpointing mode (CPU, CI);
- ``default``: fp32, bf16, int8, nf4 x 512, 2048, 8192 x off / on / offload;
- ``full``: every precision x 256 ... 32768 (powers of two) x every mode.

Cells are ordered model, precision, checkpointing mode, batch size, then sequence length
ascending, so that a sweep meets the short (cheap) cells of a row before the long ones;
cells of several world sizes (torchrun) follow their one-GPU cell.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable

from harness.core.axes import (CHECKPOINTING_MODES, GRAD_CKPT_MODES, PRECISION_MODES, PRECISIONS, in_preset,
                                normalize_attention, normalize_grad_ckpt, normalize_precision, normalize_stack)
from harness.core.spec import PARALLEL_STRATEGIES, CellSpec, LoraSpec
from harness.core.errors import SpecError

# Which modes a preset sweeps is part of each mode's registry entry (harness.core.axes).
PRESET_LENGTHS: dict[str, tuple[int, ...]] = {
    "smoke": (64, 256),
    "default": (512, 2048, 8192),
    "full": tuple(2 ** k for k in range(8, 16)),
}
PRESETS: dict[str, dict[str, tuple]] = {
    name: {"precision": in_preset(name, PRECISION_MODES), "seq_len": lengths,
           "grad_ckpt": in_preset(name, CHECKPOINTING_MODES)}
    for name, lengths in PRESET_LENGTHS.items()
}


def split_list(value: str | Iterable[Any] | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; lists pass through; None -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = []
        for v in value:
            items.extend(str(v).split(","))
    return [s.strip() for s in items if str(s).strip()]


def parse_ints(value, what: str, minimum: int = 1) -> list[int]:
    out = []
    for s in split_list(value):
        try:
            n = int(s.lower().replace("k", "000")) if s.lower().endswith("k") else int(s)
        except ValueError:
            raise SpecError(f"{what}: {s!r} is not a whole number") from None
        if n < minimum:
            raise SpecError(f"{what}: {n} is below the minimum of {minimum}")
        out.append(n)
    return out


@dataclass(frozen=True)
class Axes:
    models: tuple[str, ...]
    precisions: tuple[str, ...]
    seq_lens: tuple[int, ...]
    grad_ckpts: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (1,)
    steps: tuple[int, ...] = (5,)
    # torchrun cells. A world size of 1 takes no strategy (one cell, whatever
    # ``parallels`` holds); each larger one is crossed with every strategy.
    world_sizes: tuple[int, ...] = (1,)
    parallels: tuple[str, ...] = ("ddp",)
    # training stacks and attention kernels: an axis like any other, "hf" / "sdpa" by default
    stacks: tuple[str, ...] = ("hf",)
    attns: tuple[str, ...] = ("sdpa",)


def axes_for(preset: str, *, models: list[str], precision=None, seq_len=None, grad_ckpt=None,
             batch_size=None, steps=None, default_steps: int = 5, world_size=None, parallel=None, stack=None,
             attn=None) -> Axes:
    """The preset's axes, with any axis given explicitly replacing the preset's."""
    if preset not in PRESETS:
        raise SpecError(f"unknown matrix preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    precs = [normalize_precision(x) for x in split_list(precision)] or list(p["precision"])
    lens = parse_ints(seq_len, "--seq-len", minimum=2) or list(p["seq_len"])
    gcs = [normalize_grad_ckpt(x) for x in split_list(grad_ckpt)] or list(p["grad_ckpt"])
    bss = parse_ints(batch_size, "--batch-size") or [1]
    nsteps = parse_ints(steps, "--steps") or [default_steps]
    wss = parse_ints(world_size, "--world-size") or [1]
    pars = [p.lower() for p in split_list(parallel)] or ["ddp"]
    bad = [p for p in pars if p not in PARALLEL_STRATEGIES]
    if bad:
        raise SpecError(f"--parallel: unknown strategy {bad[0]!r}; choose from {', '.join(PARALLEL_STRATEGIES)}")
    if not models:
        raise SpecError("no model given")
    stacks = [normalize_stack(x) for x in split_list(stack)] or ["hf"]
    attns = [normalize_attention(x) for x in split_list(attn)] or ["sdpa"]
    return Axes(tuple(models), tuple(dict.fromkeys(precs)), tuple(sorted(set(lens))), tuple(dict.fromkeys(gcs)),
                tuple(sorted(set(bss))), tuple(sorted(set(nsteps))), tuple(sorted(set(wss))), tuple(dict.fromkeys(pars)),
                tuple(dict.fromkeys(stacks)), tuple(dict.fromkeys(attns)))


def expand(axes: Axes, *, model_paths: dict[str, str | None] | None = None, lora: LoraSpec | None = None,
           **fixed: Any) -> list[CellSpec]:
    """Every cell of the axes' cross product, in sweep order. ``fixed`` holds settings
    shared by all cells (steps, warm-up, optimizer, lr, seed, load, ...)."""
    model_paths = model_paths or {}
    order_p = {p: i for i, p in enumerate(PRECISIONS)}
    order_g = {g: i for i, g in enumerate(GRAD_CKPT_MODES)}
    tagged = len(axes.steps) > 1  # step count varies: put it in the ids
    # (world size, strategy) pairs; world size 1 once, without a strategy
    dist = list(dict.fromkeys((w, None if w == 1 else par) for w in axes.world_sizes for par in axes.parallels))
    cells = [
        CellSpec(model=m, precision=p, seq_len=s, grad_ckpt=g, batch_size=b, lora=lora or LoraSpec(),
                 model_path=model_paths.get(m), steps=n, tag=f"n{n}" if tagged else "", world_size=w, parallel=par,
                 stack=st, attn_implementation=at, **fixed)
        for m, p, g, st, at, b, n, s, (w, par) in itertools.product(
            axes.models, axes.precisions, axes.grad_ckpts, axes.stacks, axes.attns, axes.batch_sizes, axes.steps,
            axes.seq_lens, dist)
    ]
    # A multi-GPU cell comes right after its one-GPU cell (its scaling efficiency needs it).
    cells.sort(key=lambda c: (axes.models.index(c.model), order_p[c.precision], order_g[c.grad_ckpt],
                              axes.stacks.index(c.stack), axes.attns.index(c.attn_implementation), c.batch_size,
                              c.steps, c.seq_len, dist.index((c.world_size, c.parallel))))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):  # pragma: no cover - guarded by the id's construction
        raise SpecError("two cells share an id")
    return cells
