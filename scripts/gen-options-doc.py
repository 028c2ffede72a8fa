#!/usr/bin/env python3
"""Print docs/options.md: every option of the sweep, from ``harness.plan.options.OPTIONS``.

    python3 scripts/gen-options-doc.py > docs/options.md

The option list, the help texts and the defaults they state are read from the code; this
script only groups them and splits the "(default ...)" part of each help text into its own
column. An option that is not in GROUPS below lands in "Other options", so a new option
is never left out. Imports no torch (the parent side of the harness never does).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import parser as cli_parser  # noqa: E402
from harness.core.axes import CHECKPOINTING_MODES, PRECISION_MODES  # noqa: E402
from harness.plan.matrix import PRESET_LENGTHS, PRESETS  # noqa: E402
from harness.plan.options import OPTIONS  # noqa: E402

GROUPS: list[tuple[str, str, list[str]]] = [
    ("Matrix and cell settings", "What the matrix sweeps and how each cell trains. Axis options take comma "
     "lists and replace the matrix preset's axis.",
     ["model", "matrix", "precision", "seq-len", "grad-ckpt", "batch-size", "steps", "warmup-steps", "lr",
      "optimizer", "load", "seed", "device", "cell-timeout", "fail-on-oom", "no-prune"]),
    ("LoRA", "The adapter every cell trains.",
     ["lora-rank", "lora-alpha", "lora-dropout", "lora-targets", "lora-no-input-cast"]),
    ("Training stacks, compilation, attention", "Which stack loads and trains the model, and how "
     "([modes.md](modes.md#training-stacks-torchcompile-and-the-attention-kernel)).",
     ["stack", "attn", "compile"]),
    ("Run folder, resume and time limit", "Where records go and how a sweep is continued ([the README]"
     "(../README.md#run-folders-and-records)).",
     ["run-dir", "resume", "time-limit", "cache-dir"]),
    ("Reports and baselines", "Regression checks at the end of a sweep ([reports.md](reports.md)).",
     ["baseline", "baseline-fail", "baseline-across-gpus"]),
    ("Fit: VRAM budgets and the longest-context search", "[fit.md](fit.md).",
     ["vram-budget", "budgets", "granularity", "max-seq-len", "prior"]),
    ("Vision-language models", "[vlm.md](vlm.md).", ["images", "image-size", "lora-vision"]),
    ("Compatibility and stability suites", "[compat-stability.md](compat-stability.md). `--precision`, "
     "`--grad-ckpt`, `--lr`, `--seed`, `--optimizer`, `--lora-*`, `--device` and the run folder options apply "
     "to these suites too; `--seq-len`, `--steps`, `--warmup-steps`, `--batch-size`, `--load` and `--matrix` "
     "are the matrix's only.",
     ["compat-model", "compat-seq-len", "compat-steps", "compat-load", "stability-model", "stability-seq-len",
      "stability-steps", "stability-seeds", "claims-seeds"]),
    ("Several GPUs", "[multi-gpu.md](multi-gpu.md).", ["world-size", "parallel", "gpus"]),
    ("Several machines", "One sweep split into shards, or spread over a Ray cluster ([clusters.md](clusters.md)).",
     ["shard", "shard-history", "ray"]),
    ("Measurement", "How figures are taken ([measurements.md](measurements.md)).",
     ["nvml-period-ms", "sampler-mode", "adaptive-steps", "max-steps", "window-time-cap", "stable-rel",
      "int8-prequantized"]),
]

# Defaults the help text does not state as "(default X)".
DEFAULTS = {
    "precision": "the matrix preset's",
    "seq-len": "the matrix preset's",
    "grad-ckpt": "the matrix preset's",
    "run-dir": "reports/runs/<run-id>",
    "baseline": "none",
    "vram-budget": "none (the whole GPU)",
    "budgets": "none (required by the fit)",
    "prior": "none",
    "time-limit": "none",
}


def _groups(text: str):
    """Top-level parenthesised spans of ``text``: (start, end) with text[start] == '('."""
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                yield start, i + 1


def split_default(name: str, help_text: str, kind: str) -> tuple[str, str]:
    """(description without its default, default) for one option."""
    text = help_text.replace("%%", "%")
    for start, end in _groups(text):
        parts = [p.strip() for p in text[start + 1:end - 1].split(";")]
        for k, part in enumerate(parts):
            m = re.match(r"default\b:?\s*(.*)$", part)
            if not m:
                continue
            value = m.group(1)
            if not value or value.startswith(","):  # "ddp (default; ...)": the word before names it
                parts[k] = value.lstrip(", ")
                value = text[:start].split()[-1].rstrip(",")
            elif value.endswith("'s") and k + 1 < len(parts):  # "the model's; 1 for X": one default
                value = f"{value} ({parts.pop(k + 1)})"
                parts[k] = ""
            else:
                parts[k] = ""
            if kind == "flag":  # a flag is off by default; the text says what off means
                parts[k] = f"without it: {value}"
                value = "off"
            inner = "; ".join(p for p in parts if p)
            desc = (text[:start].rstrip() + (f" ({inner})" if inner else "") + text[end:]).strip()
            return desc, value
    if name in DEFAULTS:
        return text, DEFAULTS[name]
    return text, "off" if kind == "flag" else "none"


def cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def option_table(opts) -> list[str]:
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for o in opts:
        desc, default = split_default(o.name, o.help, o.kind)
        flag = f"`--{o.name}`" if o.kind == "flag" else f"`--{o.name} {o.name.upper().replace('-', '_')}`"
        rows.append(f"| {flag} | {cell(default)} | {cell(desc)} |")
    return rows


def preset_table() -> list[str]:
    rows = ["| preset | precisions | lengths (tokens) | checkpointing |", "|---|---|---|---|"]
    for name, axes in PRESETS.items():
        lengths = PRESET_LENGTHS[name]
        span = (", ".join(map(str, lengths)) if len(lengths) <= 3
                else f"{lengths[0]} ... {lengths[-1]} (powers of two)")
        rows.append(f"| `{name}` | {', '.join(axes['precision'])} | {span} | {', '.join(axes['grad_ckpt'])} |")
    return rows


def subcommand_tables() -> list[str]:
    sweep_dests = {o.dest for o in OPTIONS}
    sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out: list[str] = []
    for name, p in sub.choices.items():
        own = [a for a in p._actions if a.dest not in sweep_dests and not isinstance(a, argparse._HelpAction)]
        takes_sweep = any(a.dest in sweep_dests for a in p._actions)
        if not own and not takes_sweep:
            continue
        out.append(f"**`lora-harness {name}`**" + (" takes every sweep option above, and:" if takes_sweep and own
                                                   else " takes every sweep option above." if takes_sweep else ":"))
        if own:
            out += ["", "| argument | what it does |", "|---|---|"]
            for a in own:
                arg = f"`{a.option_strings[0]}`" if a.option_strings else f"`{a.metavar or a.dest.upper()}`"
                if a.option_strings and a.nargs != 0:
                    arg = f"`{a.option_strings[0]} {a.metavar or a.dest.upper()}`"
                what = a.help or ("a run folder" if a.metavar is None and a.dest == "run_dir" else "")
                what = what.replace("%%", "%")
                out.append(f"| {arg} | {cell(what)} |")
        out.append("")
    return out


def main() -> None:
    lines = [
        "# Options",
        "",
        "<!-- Generated by scripts/gen-options-doc.py from harness/plan/options.py (OPTIONS) and the CLI's",
        "     parser; do not edit by hand: run `python3 scripts/gen-options-doc.py > docs/options.md`. -->",
        "",
        "The sweep's options are declared once (`OPTIONS` in `harness/plan/options.py`) and are the same for",
        "`pytest suites/` (listed by `pytest --help` under \"lora-harness\") and for `lora-harness run`, `cells`",
        "and `fit`. Defaults that depend on the host say so: with an NVIDIA GPU the model is `llama-3.1-8b` and",
        "the matrix `default`; without one, `tiny-llama` on the CPU and the `smoke` matrix.",
        "",
        "## Matrix presets (`--matrix`)",
        "",
        *preset_table(),
        "",
        "Precision modes: " + ", ".join(f"`{m.name}`" for m in PRECISION_MODES) + "; checkpointing modes: "
        + ", ".join(f"`{m.name}`" + (f" (alias {', '.join(m.aliases)})" if m.aliases else "")
                    for m in CHECKPOINTING_MODES) + ". What each does: [modes.md](modes.md).",
        "",
    ]
    placed: set[str] = set()
    by_name = {o.name: o for o in OPTIONS}
    for title, intro, names in GROUPS:
        opts = [by_name[n] for n in names if n in by_name]
        placed.update(o.name for o in opts)
        if opts:
            lines += [f"## {title}", "", intro, "", *option_table(opts), ""]
    rest = [o for o in OPTIONS if o.name not in placed]
    if rest:
        lines += ["## Other options", "", *option_table(rest), ""]
    lines += ["## pytest's own options", "",
              "With `pytest suites/`, `-k` selects cells by id (`-k \"nf4 and s2048\"`), `-m` selects the opt-in "
              "suites by marker (`compat`, `stability`, `fit`, `claims`), and pytest-benchmark's "
              "`--benchmark-json FILE` writes every cell's metrics (in `extra_info`).", "",
              "## Environment variables", "",
              "| variable | what it does |", "|---|---|",
              "| `LORA_HARNESS_CACHE` | folder for synthetic checkpoints when `--cache-dir` is not given |",
              "| `LORA_HARNESS_FAKE_GPUS=N` | tests only: on a host where NVML sees no GPU, the parent sees N fake "
              "GPUs (cells run on the CPU) |",
              "| `LORA_HARNESS_RLIMIT_AS_EXTRA=BYTES` | tests only: caps each worker's address space at its size "
              "+ BYTES, so CPU cells run out of memory for real |",
              "| `LORA_HARNESS_REQUIRE_BROWSER=1` | CI: the report page's browser check fails instead of skipping "
              "where Chromium is missing |", "",
              "## Options of the other subcommands", "",
              "`lora-harness --help` and `lora-harness <command> --help` print these too.", "",
              *subcommand_tables()]
    print("\n".join(lines).rstrip() + "\n", end="")


if __name__ == "__main__":
    main()
