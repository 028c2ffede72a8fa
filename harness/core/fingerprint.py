"""The settings fingerprint of a cell: one short hash of everything that changes its
numbers. Pure module (no torch).

Two records with the same cell id measure the same thing only when their fingerprints
match. ``--resume`` reuses a record only then, a second run into a folder is a repeat
only then, and ``compare`` pools records as repeats only then.

What goes in (``settings``):
- the whole cell spec: model, precision, length, batch, checkpointing, LoRA rank / alpha /
  dropout / targets / input cast / vision, optimizer, lr, warm-up and measured steps, the
  adaptive window's rule, seed, load path, attention kernel, VRAM budget, images, world
  size and strategy, tag;
- the model's architecture: a hash of the preset's config, or of a local checkpoint's
  config.json (its folder's name alone says nothing when the folder is rewritten);
- the worker settings that move the measurements: the NVML sampler's period and mode,
  int8 pre-quantised loading;
- ``FINGERPRINT_VERSION``: raised when a harness change makes old numbers incomparable
  with new ones (a different step timer, say), and only then. It is not the record's
  schema version: a record that merely gained fields still matches.

Records written before fingerprints existed get theirs from their stored spec with
today's defaults (``of_record``), so older run folders keep resuming and feeding the fit
search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from harness.core.spec import CellSpec

FINGERPRINT_VERSION = 1
# Worker settings that change what a cell measures, with the defaults runs had before
# they were recorded.
MEASUREMENT_OPTS: dict[str, Any] = {"nvml_period_s": 0.005, "sampler_mode": "thread", "int8_prequantized": False}


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _digest(data: Any, n: int = 16) -> str:
    return hashlib.sha256(_canonical(data).encode()).hexdigest()[:n]


def model_config_hash(cell: CellSpec) -> str | None:
    """A hash of the model's architecture config; None where it cannot be read (the
    fingerprint then rests on the model's name)."""
    from harness.core.models import get_preset

    try:
        if cell.model_path:
            from pathlib import Path

            return _digest(json.loads((Path(cell.model_path) / "config.json").read_text()))
        return _digest(get_preset(cell.model).get("config"))
    except Exception:  # noqa: BLE001 - a missing preset or file: the name stands in for it
        return None


def measurement_opts(opts: dict[str, Any] | None) -> dict[str, Any]:
    """The worker settings that belong in a fingerprint, defaults filled in."""
    opts = opts or {}
    out = {}
    for key, default in MEASUREMENT_OPTS.items():
        value = opts.get(key, default)
        out[key] = default if value is None else value
    out["nvml_period_s"] = round(float(out["nvml_period_s"]), 6)
    out["int8_prequantized"] = bool(out["int8_prequantized"])
    return out


def _non_default(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict of its fields that differ from their defaults (nested ones
    too). A setting added to the spec later, at its default, so leaves every fingerprint
    made before it unchanged."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default):
            value = _non_default(value)  # a nested setting (LoRA): its own non-defaults
            if value:
                out[f.name] = value
        elif dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)  # set where the default is none (a window)
        elif value != default:
            out[f.name] = value
    return out


def settings(cell: CellSpec, opts: dict[str, Any] | None = None, *, full: bool = False) -> dict[str, Any]:
    """Everything the fingerprint covers, as a plain dict; ``full`` keeps the settings at
    their defaults too (for saying what differs)."""
    spec = cell.to_dict() if full else _non_default(cell)
    spec.pop("model_path", None)  # where a checkpoint lives is not what it is
    return {"version": FINGERPRINT_VERSION, "spec": spec, "model_config": model_config_hash(cell),
            "local_checkpoint": bool(cell.model_path), "measurement": measurement_opts(opts)}


def fingerprint(cell: CellSpec, opts: dict[str, Any] | None = None) -> str:
    return _digest(settings(cell, opts))


def of_record(record: dict[str, Any]) -> str | None:
    """A record's fingerprint: stored, or computed from its spec with today's defaults and
    the measurement settings its run used (``measurement`` when stored, else defaults).
    None for a record without a usable spec."""
    if record.get("fingerprint"):
        return str(record["fingerprint"])
    try:
        cell = CellSpec.from_dict(record["spec"])
    except Exception:  # noqa: BLE001 - a damaged or foreign record has no fingerprint
        return None
    return fingerprint(cell, record.get("measurement_opts"))


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``['lora.rank 16 -> 8', 'steps 5 -> 3']``: where two settings dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name} {a!r} -> {b!r}")
    return out


def settings_of_record(record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return settings(CellSpec.from_dict(record["spec"]), record.get("measurement_opts"), full=True)
    except Exception:  # noqa: BLE001
        return None


def explain(record: dict[str, Any], cell: CellSpec, opts: dict[str, Any] | None) -> str:
    """Why a stored record does not stand for ``cell`` now (the first few differences)."""
    old = settings_of_record(record)
    if old is None:
        return "the stored record has no readable spec"
    diffs = differences(old, settings(cell, opts, full=True))
    diffs = [d.replace("spec.", "", 1) if d.startswith("spec.") else d for d in diffs]
    if not diffs:
        return "its stored fingerprint differs (recorded by another harness version)"
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return ", ".join(diffs[:4]) + more
