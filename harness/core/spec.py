"""CellSpec: the frozen description of one LoRA training cell.

Pure module: no torch, no I/O. A spec is everything a worker needs to reproduce a cell;
its ``cell_id`` is stable across runs and hosts so results can be compared and resumed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from harness.core.axes import (is_quantised, normalize_attention, normalize_grad_ckpt, normalize_precision,
                               normalize_stack)
from harness.core.errors import SpecError

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "sgd")
LOAD_MODES: tuple[str, ...] = ("auto", "config", "pretrained")
# How a cell with world_size > 1 spreads over its GPUs (DDP is the default).
PARALLEL_STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter settings. ``target_modules='all-linear'`` is every linear layer but the
    output head (peft's meaning); a comma list names module suffixes instead."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"
    # Vision-language models: LoRA on the vision tower's linear layers too (by default
    # only the language model's get adapters).
    include_vision: bool = False
    # peft casts each LoRA layer's input to the adapter's dtype (float32) before the
    # adapter; under autocast the adapter's matmul casts it back, so layers that share an
    # input (q / k / v, gate / up) each keep a private copy for the backward pass. False
    # turns the cast off (``cast_input_dtype_enabled``; same numbers under autocast).
    input_cast: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise SpecError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class WindowSpec:
    """An adaptive measured window (``harness.core.window.window_decision`` is the rule).

    The cell's ``steps`` is the minimum; after it the window stops as soon as the median
    of all measured step times so far has moved by at most ``stable_rel`` (relative to
    the latest median) over the last ``stable_steps`` steps, or once the measured steps
    have taken ``time_cap_s`` seconds in all, or at ``max_steps``.
    """

    max_steps: int = 50
    time_cap_s: float = 30.0
    stable_rel: float = 0.01
    stable_steps: int = 3

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise SpecError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.time_cap_s > 0:
            raise SpecError(f"the window's time cap must be positive, got {self.time_cap_s}")
        if not self.stable_rel > 0:
            raise SpecError(f"--stable-rel must be positive, got {self.stable_rel}")
        if self.stable_steps < 1:
            raise SpecError(f"the stability rule needs >= 1 step, got {self.stable_steps}")


@dataclass(frozen=True)
class CellSpec:
    """One cell of the matrix. Frozen: a value, hashable, serialisable to JSON."""

    model: str
    precision: str
    seq_len: int
    grad_ckpt: str = "off"
    batch_size: int = 1
    lora: LoraSpec = field(default_factory=LoraSpec)
    optimizer: str = "adamw"
    lr: float = 2e-3
    warmup_steps: int = 2
    steps: int = 5
    seed: int = 0
    # auto: 16/32-bit built from the config directly on the device, quantised modes
    # through from_pretrained on a synthetic checkpoint; the other two force a path.
    load: str = "auto"
    # Inputs to the attention kernel choice; "sdpa" is transformers' default.
    attn_implementation: str = "sdpa"
    # Where the checkpoint for a local model lives (``model`` is then its short name).
    model_path: str | None = None
    # Extra id component, set by the matrix when an axis that is normally constant over a
    # sweep (for example the step count) varies, so ids stay unique.
    tag: str = ""
    # Emulate a GPU with this much memory (bytes; None: the whole device). Part
    # of the id, so cells at different budgets are different cells (runs, --resume).
    vram_budget_bytes: int | None = None
    # Vision-language models: images per sample and their edge in pixels (square images);
    # None is the model preset's default (one 448 x 448 image for qwen2.5-vl-7b).
    image_count: int | None = None
    image_size_px: int | None = None
    # Processes (GPUs) the cell runs on, launched by torchrun; and how they share
    # the work: "ddp" (default when world_size > 1) or "fsdp". None when world_size is 1.
    world_size: int = 1
    parallel: str | None = None
    # An adaptive measured window (None: exactly ``steps`` measured steps). Like
    # ``steps`` it is a measurement setting, not part of the id.
    window: WindowSpec | None = None
    # The training stack (harness.core.axes.STACKS): "hf" is transformers + peft as they
    # come; others load the model or train it with their own kernels. And whether the
    # model is compiled with torch.compile. Both in the id when not the default.
    stack: str = "hf"
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", normalize_precision(self.precision))
        object.__setattr__(self, "grad_ckpt", normalize_grad_ckpt(self.grad_ckpt))
        object.__setattr__(self, "stack", normalize_stack(self.stack))
        object.__setattr__(self, "attn_implementation", normalize_attention(self.attn_implementation))
        if self.seq_len < 2:
            raise SpecError(f"sequence length must be >= 2 tokens, got {self.seq_len}")
        if self.batch_size < 1:
            raise SpecError(f"batch size must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise SpecError(f"measured steps must be >= 1, got {self.steps}")
        if self.warmup_steps < 0:
            raise SpecError(f"warm-up steps must be >= 0, got {self.warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.load not in LOAD_MODES:
            raise SpecError(f"unknown load mode {self.load!r}; choose from {', '.join(LOAD_MODES)}")
        if self.vram_budget_bytes is not None and self.vram_budget_bytes <= 0:
            raise SpecError(f"a VRAM budget must be positive, got {self.vram_budget_bytes}")
        if self.image_count is not None and self.image_count < 0:
            raise SpecError(f"image count must be >= 0, got {self.image_count}")
        if self.image_size_px is not None and self.image_size_px < 1:
            raise SpecError(f"image size must be >= 1 pixel, got {self.image_size_px}")
        if self.world_size < 1:
            raise SpecError(f"world size must be >= 1, got {self.world_size}")
        par = str(self.parallel).strip().lower() if self.parallel not in (None, "", "none") else None
        if self.world_size == 1 and par is not None:
            raise SpecError(f"parallel strategy {self.parallel!r} needs world_size > 1 (a one-process cell has none)")
        if self.world_size > 1:
            par = par or "ddp"
            if par not in PARALLEL_STRATEGIES:
                raise SpecError(f"unknown parallel strategy {self.parallel!r}; choose from {', '.join(PARALLEL_STRATEGIES)}")
        object.__setattr__(self, "parallel", par)
        if self.window is not None and self.world_size > 1:
            raise SpecError("an adaptive measured window is decided per process; torchrun cells (world size > 1) "
                            "measure a fixed number of steps (drop --adaptive-steps for them)")
        if self.window is not None and self.window.max_steps < self.steps:
            raise SpecError(f"--max-steps ({self.window.max_steps}) is below the minimum of {self.steps} measured steps")
        if self.compile and self.warmup_steps < 2:
            raise SpecError("--compile needs >= 2 warm-up steps: the first runs uncompiled (the checkpointing proof), "
                            "the second compiles, so no measured step includes compilation")
        if self.stack == "unsloth" and self.load == "config":
            raise SpecError("the unsloth stack loads from a checkpoint (FastLanguageModel.from_pretrained); "
                            "load=config is not offered")
        if not self.model or "/" in self.model:
            raise SpecError(f"model name must be a preset name or a checkpoint's short name, got {self.model!r}")

    @property
    def cell_id(self) -> str:
        """Readable, stable id, e.g. ``llama-3.1-8b/nf4/s2048/gc-on`` (``.../vram24GiB`` under a
        VRAM budget).

        Settings that are constant across a sweep (LoRA rank, steps, optimizer) are not
        in the id; batch size, a forced load path, the training stack, torch.compile, the
        attention kernel, image count / size and vision LoRA are, when not the default
        (e.g. ``llama-3.1-8b/bf16/s2048/gc-on/stack-liger/compile``,
        ``qwen2.5-vl-7b/bf16/s2048/gc-on/img2/px224``); a multi-process cell ends in
        ``/ws<N>-<ddp|fsdp>``.
        """
        parts = [self.model, self.precision, f"s{self.seq_len}", f"gc-{self.grad_ckpt}"]
        if self.batch_size != 1:
            parts.append(f"b{self.batch_size}")
        if self.load != "auto":
            parts.append(f"load-{self.load}")
        if self.stack != "hf":
            parts.append(f"stack-{self.stack}")
        if self.compile:
            parts.append("compile")
        if self.attn_implementation != "sdpa":
            parts.append(f"attn-{self.attn_implementation}")
        if self.vram_budget_bytes is not None:
            from harness.core.budget import budget_label

            parts.append(f"vram{budget_label(self.vram_budget_bytes)}")
        if self.image_count is not None:
            parts.append(f"img{self.image_count}")
        if self.image_size_px is not None:
            parts.append(f"px{self.image_size_px}")
        if self.lora.include_vision:
            parts.append("lora-vision")
        if not self.lora.input_cast:
            parts.append("lora-nocast")
        if self.world_size > 1:  # e.g. /ws2-ddp
            parts.append(f"ws{self.world_size}-{self.parallel}")
        if self.tag:
            parts.append(self.tag)
        return "/".join(parts)

    @property
    def max_measured_steps(self) -> int:
        """Measured steps the cell may run: ``steps``, or the adaptive window's maximum."""
        return self.window.max_steps if self.window is not None else self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def quantized(self) -> bool:
        return is_quantised(self.precision)

    def resolved_load(self) -> str:
        if self.load != "auto":
            return self.load
        # Unsloth's loader reads a checkpoint folder whatever the precision
        return "pretrained" if (self.quantized or self.model_path or self.stack == "unsloth") else "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CellSpec":
        data = dict(data)
        lora = data.pop("lora", None) or {}
        window = data.pop("window", None)  # absent in records written before adaptive windows
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown cell fields: {', '.join(sorted(unknown))}")
        return cls(lora=LoraSpec(**lora), window=WindowSpec(**window) if window else None, **data)

    def replace(self, **changes: Any) -> "CellSpec":
        return dataclasses.replace(self, **changes)


def safe_name(cell_id: str) -> str:
    """A file-name-safe form of a cell id (for log files)."""
    return cell_id.replace(os.sep, "__").replace("/", "__")
