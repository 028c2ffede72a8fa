"""Cells of the compatibility and stability suites. Pure module (no torch, no I/O).

The matrix suite sweeps precision x length x checkpointing; these two suites ask other
questions and pick their own cells from the same options (``harness.plan.options``):

- **compat**: does every precision x checkpointing mode train on this host, and do the
  capability rules predict it? Every precision x mode, a short length, two steps (one
  warm-up), and for 16/32-bit precisions both load paths (``from_config`` and
  ``from_pretrained``; quantised cells always load through ``from_pretrained``).
- **stability**: does each precision train like fp32? The same LoRA and synthetic task
  for 100 steps, all precisions loaded from the same synthetic checkpoint
  (``load=pretrained``) so they share the base weights; fp32 is always run as the
  reference. Every cell runs once per seed (``--stability-seeds``: 3 with a GPU, 2
  without; ``--seed`` and the next ones): the base weights do not depend on the seed, the
  data and the adapter's initialisation do, and each seed's cell is compared with fp32 of
  the same seed. The verdict is judged against the spread over the seeds
  (``harness.report.stability``). With ``--stack`` naming stacks other than hf, each of
  them trains the selected precisions it offers on the same tokens and seeds, and is
  compared with plain hf bf16 of the same seed (which then always runs too). Plus the **overflow case**: ``tiny-overflow`` in fp32 /
  bf16 / fp16, built so that fp16 activations exceed 65,504 (with the same seeds).

Shared with the matrix: --model (unless --compat-model / --stability-model), --precision,
--grad-ckpt (compat), --lr, --seed, --optimizer, --lora-*, --device and the run options.
Not shared: --seq-len, --steps, --warmup-steps, --batch-size, --load, --matrix.
Each suite's cells carry a tag in their id (``.../compat``, ``.../stability``) so they
never collide with matrix cells in a shared run folder; a stability cell of the second
seed on ends in ``/seed<k>`` (``.../stability/seed1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.plan.matrix import split_list
from harness.plan.options import OPTIONS, build_config
from harness.core import evidence
from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS, STACK_BY_NAME, normalize_stack
from harness.core.spec import CellSpec
from harness.core.errors import SpecError

GPU_SUITE_MODEL = "llama-3.2-1b"  # small real shape: fp32 LoRA fits any GPU of 16 GB or more
CPU_SUITE_MODEL = "tiny-llama"
OVERFLOW_MODEL = "tiny-overflow"
OVERFLOW_PRECISIONS = ("fp32", "bf16", "fp16")
OVERFLOW_SEQ_LEN = 64
COMPAT_LOADS = ("config", "pretrained")
# Options the suites take from the matrix's set (see the module docstring).
SHARED = ("model", "precision", "grad-ckpt", "lr", "optimizer", "lora-rank", "lora-alpha", "lora-dropout",
          "lora-targets", "seed", "device", "cell-timeout", "cache-dir", "nvml-period-ms", "stack")


@dataclass(frozen=True)
class SuiteDefaults:
    seq_len_gpu: int
    seq_len_cpu: int
    steps: int


COMPAT = SuiteDefaults(seq_len_gpu=256, seq_len_cpu=64, steps=2)
STABILITY = SuiteDefaults(seq_len_gpu=256, seq_len_cpu=64, steps=100)
STABILITY_SEEDS_GPU, STABILITY_SEEDS_CPU = 3, 2


def _values(values: dict[str, Any]) -> dict[str, Any]:
    """Option values keyed by option name, whether given by dest or by name."""
    return {o.name: values.get(o.dest, values.get(o.name, values.get(o.name.replace("-", "_")))) for o in OPTIONS}


def _uses_gpu(v: dict[str, Any], facts: dict[str, Any]) -> bool:
    return bool(facts.get("has_gpu")) and (v.get("device") or "auto").lower() != "cpu"


def _cells(v: dict[str, Any], facts: dict[str, Any], **fixed: Any) -> list[CellSpec]:
    """Cells from the shared options plus ``fixed`` (option names with dashes as '_')."""
    given = {k.replace("-", "_"): v[k] for k in SHARED if v.get(k) is not None}
    # The suites' own defaults, not a matrix preset's: every precision and every mode.
    given.setdefault("precision", ",".join(PRECISIONS))
    given.setdefault("grad_ckpt", ",".join(GRAD_CKPT_MODES))
    given.update({k: val for k, val in fixed.items() if val is not None})
    return list(build_config(given, facts).cells)


def _tagged(cells: list[CellSpec], tag: str) -> list[CellSpec]:
    out, seen = [], set()
    for c in cells:
        t = c.replace(tag=f"{tag}-{c.tag}" if c.tag else tag)
        if t.cell_id not in seen:
            seen.add(t.cell_id)
            out.append(t)
    return out


def _steps(n: int | None, default: int, what: str) -> int:
    n = default if n is None else int(n)
    if n < 1:
        raise SpecError(f"--{what} must be >= 1, got {n}")
    return n


def _seq_len(n: int | None, d: SuiteDefaults, gpu: bool, what: str) -> int:
    n = (d.seq_len_gpu if gpu else d.seq_len_cpu) if n is None else int(n)
    if n < 2:
        raise SpecError(f"--{what} must be >= 2 tokens, got {n}")
    return n


def _suite_basics(v: dict[str, Any], facts: dict[str, Any], suite: str, d: SuiteDefaults) -> tuple[str, int, int]:
    """A suite's model, step count and length from its --<suite>-* options and defaults."""
    gpu = _uses_gpu(v, facts)
    model = v[f"{suite}-model"] or v["model"] or (GPU_SUITE_MODEL if gpu else CPU_SUITE_MODEL)
    steps = _steps(v[f"{suite}-steps"], d.steps, f"{suite}-steps")
    return model, steps, _seq_len(v[f"{suite}-seq-len"], d, gpu, f"{suite}-seq-len")


def compat_cells(values: dict[str, Any], facts: dict[str, Any]) -> tuple[CellSpec, ...]:
    """Every precision x checkpointing mode (x load path for 16/32-bit), two short steps."""
    v = _values(values)
    model, steps, seq = _suite_basics(v, facts, "compat", COMPAT)
    loads = split_list(v["compat-load"]) or list(COMPAT_LOADS)
    bad = [x for x in loads if x not in COMPAT_LOADS]
    if bad:
        raise SpecError(f"--compat-load: {bad[0]!r} is not a load path; choose from {', '.join(COMPAT_LOADS)}")
    # One warm-up step when there are two or more: the measured step is then past the
    # one-off costs (kernel selection, allocator growth).
    common = dict(model=model, seq_len=str(seq), steps=str(max(1, steps - 1)), warmup_steps=min(1, steps - 1))
    cells = _cells(v, facts, load="auto", **common)  # config for 16/32-bit, pretrained for quantised
    if "config" not in loads:
        cells = [c for c in cells if c.quantized or c.model_path]
    if "pretrained" in loads:
        cells += [c for c in _cells(v, facts, load="pretrained", **common) if not c.quantized and not c.model_path]
    # Group a precision's cells together (config before pretrained), modes in their order.
    order = {c.cell_id: i for i, c in enumerate(cells)}
    cells.sort(key=lambda c: (PRECISIONS.index(c.precision), c.load != "auto", order[c.cell_id]))
    return tuple(_tagged(cells, "compat"))


def stability_seeds(values: dict[str, Any], facts: dict[str, Any]) -> tuple[int, ...]:
    """The seeds every stability cell runs with: --seed and the next --stability-seeds - 1."""
    v = _values(values)
    n = v["stability-seeds"]
    n = (STABILITY_SEEDS_GPU if _uses_gpu(v, facts) else STABILITY_SEEDS_CPU) if n is None else int(n)
    if n < 1:
        raise SpecError(f"--stability-seeds must be >= 1, got {n}")
    return evidence.seeds(int(v["seed"] or 0), n)


def _seeded(cells: list[CellSpec], seeds: tuple[int, ...]) -> tuple[CellSpec, ...]:
    """Each cell once per seed, a cell's seeds next to each other; the first seed keeps the id."""
    return tuple(c.replace(seed=s, tag=evidence.seed_tag(c.tag, s, seeds[0])) for c in cells for s in seeds)


def stability_cells(values: dict[str, Any], facts: dict[str, Any]) -> tuple[CellSpec, ...]:
    """fp32 (the reference) and every selected precision: same LoRA and checkpoint, each seed."""
    v = _values(values)
    model, steps, seq = _suite_basics(v, facts, "stability", STABILITY)
    precisions = split_list(v["precision"])
    stacks = [normalize_stack(x) for x in split_list(v["stack"])] or ["hf"]
    if precisions:
        precisions = ["fp32"] + precisions  # the reference curve every other one is compared with
    if stacks != ["hf"]:  # other stacks are compared with hf bf16: it runs, with fp32 as its own reference
        stacks = ["hf"] + [x for x in stacks if x != "hf"]
        precisions = list(dict.fromkeys((precisions or list(PRECISIONS)) + ["bf16"]))
    cells = _cells(dict(v, precision=",".join(precisions) or None, stack=",".join(stacks)), facts, model=model,
                   seq_len=str(seq), steps=str(steps), warmup_steps=0, load="pretrained", grad_ckpt="off")
    cells = [c for c in cells if _offered(c)]
    return _seeded(_tagged(cells, "stability"), stability_seeds(values, facts))


def _offered(cell: CellSpec) -> bool:
    """An hf cell, or another stack's cell of a precision its loader offers (fp32 is hf's
    reference only: another stack is compared with hf bf16)."""
    offered = STACK_BY_NAME[cell.stack].precisions
    return cell.stack == "hf" or (cell.precision != "fp32" and (offered is None or cell.precision in offered))


def overflow_cells(values: dict[str, Any], facts: dict[str, Any]) -> tuple[CellSpec, ...]:
    """The fp16 overflow case: tiny-overflow in fp32, bf16 and fp16 (always all three)."""
    v = _values(values)
    steps = _steps(v["stability-steps"], STABILITY.steps, "stability-steps")
    cells = _cells(dict(v, model=None, precision=None, stack=None), facts, model=OVERFLOW_MODEL,
                   precision=",".join(OVERFLOW_PRECISIONS), seq_len=str(OVERFLOW_SEQ_LEN), steps=str(steps),
                   warmup_steps=0, load="pretrained", grad_ckpt="off")
    return _seeded(_tagged(cells, "stability"), stability_seeds(values, facts))


def seed_siblings(cell: CellSpec, cells: tuple[CellSpec, ...] | list[CellSpec]) -> list[CellSpec]:
    """The cells among ``cells`` that repeat ``cell``'s run with another seed (itself included)."""
    key = evidence.repeat_key(cell.to_dict())
    return [c for c in cells if evidence.repeat_key(c.to_dict()) == key]


def loading_model(values: dict[str, Any], facts: dict[str, Any]) -> str:
    """The model the loading checks load several times: the small suite model (the
    stability suite's), not the possibly large compat model."""
    v = _values(values)
    return v["stability-model"] or v["model"] or (GPU_SUITE_MODEL if _uses_gpu(v, facts) else CPU_SUITE_MODEL)


def reference_for(cell: CellSpec) -> CellSpec:
    """The cell a stability cell is compared with: fp32 of the same seed (itself for an
    fp32 cell); for another training stack's cell, plain hf bf16 of the same seed."""
    if cell.stack != "hf":
        return cell.replace(precision="bf16", stack="hf")
    return cell.replace(precision="fp32")


SUITES = {"compat": compat_cells, "stability": stability_cells, "overflow": overflow_cells}


def cells_for(suite: str, values: dict[str, Any], facts: dict[str, Any]) -> tuple[CellSpec, ...]:
    if suite not in SUITES:
        raise SpecError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return SUITES[suite](values, facts)
