"""The sweep's options, defined once for both the CLI and the pytest plugin. Pure module,
but for ``--shard`` (harness.plan.shard_select reads the scheduler's environment variables
and ``--shard-history``'s run folders).

Defaults depend on the host: with an NVIDIA GPU the model is ``llama-3.1-8b`` and the
matrix ``default``; without one, ``tiny-llama`` on CPU and the ``smoke`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.core.axes import ATTENTION_IMPLEMENTATIONS, GRAD_CKPT_MODES, PRECISIONS, STACK_NAMES
from harness.plan.budgets import apply_vram_budgets
from harness.plan.cluster import ray_target
from harness.plan.gpus import parse_gpus
from harness.plan.matrix import PRESETS, axes_for, expand, split_list
from harness.plan.shard_select import default_run_dir as default_shard_dir, select as select_shard
from harness.core.models import check_cell, resolve_model
from harness.core.spec import CellSpec, LoraSpec, WindowSpec
from harness.core.errors import SpecError

GPU_DEFAULT_MODEL = "llama-3.1-8b"
CPU_DEFAULT_MODEL = "tiny-llama"


@dataclass(frozen=True)
class Opt:
    name: str  # long flag without dashes, e.g. "seq-len"
    help: str
    default: Any = None
    kind: str = "str"  # str, int, float, flag

    @property
    def dest(self) -> str:
        return "lh_" + self.name.replace("-", "_")


OPTIONS: tuple[Opt, ...] = (
    Opt("model", "model preset(s) or local checkpoint folder(s), comma list (default: llama-3.1-8b with a GPU, "
                 "tiny-llama without)"),
    Opt("matrix", f"named matrix preset: {', '.join(PRESETS)} (default: default with a GPU, smoke without)"),
    Opt("precision", f"precision modes, comma list: {','.join(PRECISIONS)} (replaces the preset's)"),
    Opt("seq-len", "sequence lengths in tokens, comma list (replaces the preset's)"),
    Opt("grad-ckpt", f"gradient checkpointing modes, comma list: {','.join(GRAD_CKPT_MODES)} (alias unsloth)"),
    Opt("batch-size", "batch sizes, comma list (default 1)"),
    Opt("steps", "measured steps per cell, comma list (default 5)"),
    Opt("warmup-steps", "warm-up steps per cell, excluded from timing (default 2)", kind="int"),
    Opt("lr", "learning rate (default 2e-3)", kind="float"),
    Opt("optimizer", "adamw, adamw8bit or sgd (default adamw)"),
    Opt("lora-rank", "LoRA rank (default 16)", kind="int"),
    Opt("lora-alpha", "LoRA alpha (default 32)", kind="int"),
    Opt("lora-dropout", "LoRA dropout (default 0.0)", kind="float"),
    Opt("lora-targets", "LoRA target modules: all-linear (default) or a comma list of module names"),
    Opt("load", "model load path: auto (default), config or pretrained"),
    Opt("seed", "random seed (default 0)", kind="int"),
    Opt("device", "auto (default), cuda or cpu"),
    Opt("run-dir", "run folder (default reports/runs/<run-id>)"),
    Opt("resume", "skip cells already recorded in the run folder (the latest run without --run-dir)", kind="flag"),
    Opt("cell-timeout", "seconds before a cell is killed and recorded as timeout (default 900 with a GPU, 300 "
                        "without)", kind="float"),
    Opt("fail-on-oom", "count out-of-memory cells as failures (default: they are measurements)", kind="flag"),
    Opt("cache-dir", "folder for synthetic checkpoints (default $LORA_HARNESS_CACHE or ~/.cache/lora-harness)"),
    Opt("nvml-period-ms", "NVML sampling period in milliseconds (default 5; 0 turns the sampler off: no NVML peak "
                          "is recorded)", kind="float"),
    Opt("no-prune", "run cells that must run out of memory (a shorter cell of the same row already did) instead of "
                    "recording them as pruned OOMs", kind="flag"),
    # reports and baselines
    Opt("baseline", "after the sweep, compare its cells with this baseline run folder (comma list: several, pooled) "
                    "and fail on regression; the report goes to <run folder>/compare.md"),
    # (help texts go through argparse's %-formatting: a literal percent sign is %%)
    Opt("baseline-fail", "regression thresholds for --baseline, comma list of METRIC:+N%% or METRIC:-N%% (the sign "
                         "says which way is worse; default tokens_per_s:-5%%,peak_vram_bytes:+3%%); status changes "
                         "for the worse always regress"),
    # will it fit: budgets and the longest-context search
    Opt("vram-budget", "emulate GPUs of these memory sizes on the real one, comma list (24GiB, 24GB, 24000MiB; a bare "
                       "number is GiB); each cell runs once per budget and its id ends in /vram<size>; needs a CUDA "
                       "device"),
    Opt("budgets", "fit: VRAM budgets to search, comma list (bare numbers are GiB), e.g. 8,12,16,24,40,48,80"),
    Opt("granularity", "fit: sequence length step of the search in tokens (default 256)", kind="int"),
    Opt("max-seq-len", "fit: longest sequence the search tries (default: the model's max_position_embeddings)",
        kind="int"),
    Opt("prior", "fit: run folders whose records seed the memory model's first guesses (never counted as "
                 "measurements), comma list"),
    Opt("time-limit", "start no new cell once this process has run this many seconds: the matrix's cells left are "
                      "not run and not recorded (pytest: skipped; --resume continues), fit's unfinished answers "
                      "are reported as not measured", kind="float"),
    # vision-language models
    Opt("images", "vision-language models: images per sample (default: the model's; 1 for qwen2.5-vl-7b)",
        kind="int"),
    Opt("image-size", "vision-language models: edge of the square images in pixels, a multiple of patch x merge "
                      "(28 for Qwen2.5-VL) (default: the model's; 448 for qwen2.5-vl-7b)", kind="int"),
    Opt("lora-vision", "vision-language models: LoRA on the vision tower's linear layers too (default: the "
                       "language model's only)", kind="flag"),
    Opt("lora-no-input-cast", "turn off peft's cast of each LoRA layer's input to the adapter's dtype (under autocast "
                              "it only duplicates shared inputs; ids end in /lora-nocast)", kind="flag"),
    # the compatibility and stability suites (suites/test_compat.py, suites/test_stability.py; see harness/plan/suites.py).
    # --precision, --grad-ckpt, --lr, --seed, --optimizer, --lora-*, --device and the run options apply to
    # these suites too; --seq-len, --steps, --warmup-steps, --batch-size, --load and --matrix do not.
    Opt("compat-model", "model of the compatibility suite (default: --model, else llama-3.2-1b with a GPU, "
                        "tiny-llama without)"),
    Opt("compat-seq-len", "sequence length of compatibility cells (default 256 with a GPU, 64 without)", kind="int"),
    Opt("compat-steps", "training steps per compatibility cell, the first a warm-up (default 2)", kind="int"),
    Opt("compat-load", "load paths for 16/32-bit compatibility cells: config, pretrained or both (default both; "
                       "quantised cells always load through from_pretrained)"),
    Opt("stability-model", "model of the stability suite (default: --model, else llama-3.2-1b with a GPU, "
                           "tiny-llama without)"),
    Opt("stability-seq-len", "sequence length of stability cells (default 256 with a GPU, 64 without)", kind="int"),
    Opt("stability-steps", "training steps per stability cell (default 100)", kind="int"),
    Opt("stability-seeds", "seeds per stability cell: --seed and the next ones, each a cell of its own (ids of "
                           "the second on end in /seed<k>); a verdict is judged against their spread, and one seed "
                           "gives none (default 3 with a GPU, 2 without)", kind="int"),
    # the claims suite (suites/test_claims.py, harness/fit/claims_run.py)
    Opt("claims-seeds", "seeds of the claims' comparison cells (tokens/s, loss curves, peaks): --seed and the next "
                        "ones; a comparison is decided only outside their spread, so one seed decides none "
                        "(default 2)", kind="int"),
    # torchrun cells (harness/run/torchrun.py launches them, harness/cell/rank.py is each rank)
    Opt("world-size", "processes (GPUs) per cell, comma list (default 1); a cell with more than one is launched "
                      "with torchrun, one rank per GPU (CPU hosts: gloo, one rank per process); its id ends in "
                      "/ws<N>-<strategy>"),
    Opt("parallel", "how a cell with --world-size > 1 spreads over its GPUs, comma list: ddp (default; every rank "
                    "holds the whole model) or fsdp (weights sharded, for a model that does not fit one GPU)"),
    # cells in parallel, one worker server pinned to each GPU (harness/plan/gpus.py, harness/run/pool.py)
    Opt("gpus", "run cells in parallel, one at a time per GPU, each worker pinned to its GPU: NVML indexes as "
                "nvidia-smi shows them (0,1) or all (default: serial on the first visible GPU)"),
    Opt("baseline-across-gpus", "--baseline: also compare cells measured on different GPU models (default: a "
                                "cell is compared only with the same cell on the same GPU model)", kind="flag"),
    # how cells are measured (harness.core.phases; the window's rule is in its docstring and benchmarks/README.md)
    Opt("adaptive-steps", "adaptive measured window: --steps is the minimum; stop once the median step time is "
                          "stable, the window's time cap is reached, or at --max-steps", kind="flag"),
    Opt("max-steps", "adaptive window: most measured steps (default 50)", kind="int"),
    Opt("window-time-cap", "adaptive window: stop after this many seconds of measured steps, once --steps ran "
                           "(default 30)", kind="float"),
    Opt("stable-rel", "adaptive window: stable when the running median moved by at most this fraction over the "
                      "last 3 steps (default 0.01)", kind="float"),
    Opt("sampler-mode", "where the NVML sampler polls from: thread (default, in the cell's process) or process (a "
                        "small process of its own, which never holds the training loop's Python lock)"),
    # sweeps beyond one machine: harness/plan/shard.py (the split), docs/clusters.md (schedulers)
    Opt("shard", "run shard K of N of the selected cells (1/4 ... 4/4): whole rows per shard, balanced by "
                 "predicted time, the same split in every process; auto takes K from SLURM_ARRAY_TASK_ID (N from "
                 "SLURM_ARRAY_TASK_COUNT) or JOB_COMPLETION_INDEX (0-based; give N as auto/N); the run folder "
                 "defaults to reports/runs/<time>-<host>-shardKofN"),
    Opt("ray", "run the cells on a Ray cluster, one at a time per GPU of every node (each worker pinned to its "
               "GPU, one fork server per GPU): auto (the cluster this machine joined), ADDRESS (host:6379 or "
               "ray://host:10001) or local[:N] (start a one-node cluster with N GPUs, default 2; fake ones on a host "
               "without GPUs, cells then on the CPU); needs pip install -e .[ray]; this process writes the run folder"),
    Opt("shard-history", "--shard: balance the shards by the wall times of these earlier run folders (comma list, "
                         "folders of run folders or quoted globs; the same for every shard) instead of the token "
                         "model"),
    Opt("stack", f"training stacks, comma list: {','.join(STACK_NAMES)} (default hf: transformers + peft); others need "
                 "their package (pip install -e .[liger], .[unsloth]) and a GPU; ids end in /stack-<name>"),
    Opt("attn", f"attention implementations, comma list: {','.join(ATTENTION_IMPLEMENTATIONS)} (default sdpa); ids "
                "end in /attn-<name> when not sdpa"),
    Opt("compile", "compile the model with torch.compile (compile time is measured apart from the steps); ids end in "
                   "/compile", kind="flag"),
    Opt("int8-prequantized", "int8 cells of presets load a pre-quantised int8 checkpoint (written once per cache "
                             "folder) instead of converting the bf16 one at every load", kind="flag"),
)


@dataclass(frozen=True)
class SweepConfig:
    cells: tuple[CellSpec, ...]
    matrix: str
    device: str = "auto"
    run_dir: str | None = None
    resume: bool = False
    fail_on_oom: bool = False
    cell_timeout_s: float = 900.0
    cache_dir: str | None = None
    nvml_period_s: float = 0.005
    prune: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    gpus: tuple = ()  # harness.plan.gpus.GpuSlot per --gpus entry; () = serial
    int8_prequantized: bool = False  # int8 cells load a checkpoint quantised once, not at every load
    sampler_mode: str = "thread"  # where the NVML sampler polls from: a thread, or its own process
    time_limit_s: float | None = None  # --time-limit: no new cell after this many seconds of the process
    shard: Any = None  # --shard: harness.plan.shard.ShardPlan (``cells`` is then this shard's part)
    ray: Any = None  # --ray: harness.plan.cluster.RayTarget; None = this host only

    def out_of_time(self, started_at: float) -> bool:
        """Whether --time-limit has passed (``started_at`` on the ``time.monotonic`` clock)."""
        import time

        return self.time_limit_s is not None and time.monotonic() - started_at > self.time_limit_s

    def worker_opts(self) -> dict[str, Any]:
        opts = {"device": self.device, "cache_dir": self.cache_dir, "nvml_period_s": self.nvml_period_s}
        if self.int8_prequantized:
            opts["int8_prequantized"] = True
        if self.sampler_mode != "thread":
            opts["sampler_mode"] = self.sampler_mode
        return opts


def build_config(values: dict[str, Any], facts: dict[str, Any]) -> SweepConfig:
    """Options (keyed by ``Opt.dest`` or plain name) + host facts -> the sweep's cells."""
    v = {o.name: values.get(o.dest, values.get(o.name.replace("-", "_"))) for o in OPTIONS}
    for o in OPTIONS:  # an option given with nothing in it must not mean "the preset's values"
        if o.kind == "str" and isinstance(v[o.name], str) and not split_list(v[o.name]):
            raise SpecError(f"--{o.name} is empty: give a value (see --help) or leave the option out")
    device = (v["device"] or "auto").lower()
    if device not in ("auto", "cuda", "cpu"):
        raise SpecError(f"--device must be auto, cuda or cpu, got {v['device']!r}")
    gpu = bool(facts.get("has_gpu")) and device != "cpu"
    if device == "cuda" and not facts.get("has_gpu"):
        # every cell would be unsupported and the sweep would measure nothing
        why = facts.get("nvml_error") or "NVML reports no NVIDIA GPU"
        raise SpecError(f"--device cuda: this host has no CUDA device ({why}); run on a GPU host, or use --device cpu")
    models_raw = split_list(v["model"]) or [GPU_DEFAULT_MODEL if gpu else CPU_DEFAULT_MODEL]
    refs = [resolve_model(m) for m in models_raw]
    matrix = v["matrix"] or ("default" if gpu else "smoke")
    axes = axes_for(matrix, models=[r.name for r in refs], precision=v["precision"], seq_len=v["seq-len"],
                    grad_ckpt=v["grad-ckpt"], batch_size=v["batch-size"], steps=v["steps"],
                    world_size=v["world-size"], parallel=v["parallel"], stack=v["stack"], attn=v["attn"])
    lora_kw = {k: v[n] for k, n in (("rank", "lora-rank"), ("alpha", "lora-alpha"), ("dropout", "lora-dropout"),
                                    ("target_modules", "lora-targets")) if v[n] is not None}
    fixed = {k: v[n] for k, n in (("warmup_steps", "warmup-steps"), ("lr", "lr"), ("optimizer", "optimizer"),
                                  ("load", "load"), ("seed", "seed")) if v[n] is not None}
    # vision-language models: image settings per cell; LoRA on the vision tower
    fixed.update({k: v[n] for k, n in (("image_count", "images"), ("image_size_px", "image-size")) if v[n] is not None})
    if v["lora-vision"]:
        lora_kw["include_vision"] = True
    if v["lora-no-input-cast"]:
        lora_kw["input_cast"] = False
    if v["compile"]:
        fixed["compile"] = True
    window = window_from_options(v)
    if window is not None:
        fixed["window"] = window
    cells = expand(axes, model_paths={r.name: r.path for r in refs}, lora=LoraSpec(**lora_kw), **fixed)
    cells = apply_vram_budgets(cells, v["vram-budget"], facts, gpu)  # a cell per budget
    cells = [check_cell(c) for c in cells]  # lengths and image settings against each model
    timeout = v["cell-timeout"] if v["cell-timeout"] is not None else (900.0 if gpu else 300.0)
    if timeout <= 0:
        raise SpecError("--cell-timeout must be positive")
    period_ms = v["nvml-period-ms"] if v["nvml-period-ms"] is not None else 5.0
    if period_ms < 0:  # 0 turns the sampler off (its own cost is measured against that)
        raise SpecError("--nvml-period-ms must be positive, or 0 to turn the sampler off")
    sampler_mode = (v["sampler-mode"] or "thread").lower()
    if sampler_mode not in ("thread", "process"):
        raise SpecError(f"--sampler-mode must be thread or process, got {v['sampler-mode']!r}")
    if period_ms == 0 and v["vram-budget"]:
        raise SpecError("--vram-budget judges cells by the sampled NVML peak: it needs --nvml-period-ms > 0")
    if v["time-limit"] is not None and v["time-limit"] <= 0:
        raise SpecError("--time-limit must be positive")
    ray = ray_target(v)  # before --gpus: its refusal of --gpus is the clearer line
    gpus = parse_gpus(v["gpus"], facts, device)
    if gpus and any(c.world_size > 1 for c in cells):
        raise SpecError("--gpus runs one-GPU cells side by side; cells with --world-size above 1 take the host's "
                        "GPUs through torchrun: run them in a separate sweep without --gpus")
    # --shard: this process's part of the sweep, decided after the checks above so they judge the whole sweep
    shard = select_shard(cells, v["shard"], v["shard-history"])
    cells = list(shard.cells) if shard else cells
    run_dir = v["run-dir"] or (default_shard_dir(shard, resume=bool(v["resume"])) if shard else None)
    return SweepConfig(cells=tuple(cells), matrix=matrix, device=device, run_dir=run_dir,
                       resume=bool(v["resume"]), fail_on_oom=bool(v["fail-on-oom"]), cell_timeout_s=float(timeout),
                       cache_dir=v["cache-dir"], nvml_period_s=period_ms / 1000.0, prune=not v["no-prune"],
                       options={k: val for k, val in v.items() if val not in (None, False)},
                       int8_prequantized=bool(v["int8-prequantized"]), sampler_mode=sampler_mode, gpus=gpus,
                       time_limit_s=v["time-limit"], shard=shard, ray=ray)


def window_from_options(v: dict[str, Any]) -> WindowSpec | None:
    """The adaptive window the options ask for (None: a fixed window). The window's
    own options without --adaptive-steps are an error, never silently ignored."""
    given = {k: v.get(k) for k in ("max-steps", "window-time-cap", "stable-rel") if v.get(k) is not None}
    if not v.get("adaptive-steps"):
        if given:
            raise SpecError(f"--{', --'.join(given)} only apply with --adaptive-steps")
        return None
    kw = {name: given[opt] for name, opt in (("max_steps", "max-steps"), ("time_cap_s", "window-time-cap"),
                                            ("stable_rel", "stable-rel")) if opt in given}
    return WindowSpec(**kw)
