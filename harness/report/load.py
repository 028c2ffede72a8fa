"""Run folders -> pandas DataFrames. Imports no torch.

``load_runs(paths)`` is the public entry: one row per cell and run folder (the cell's
last record: a resumed run may have retried it), units as stored, runs from several
hosts merged with the device as a column. ``load_run_set`` returns the same frame plus
every record (the comparison pools retries), what each run folder says about itself
(``env.json``, ``run.json``) and the warnings met on the way.

Bad input is a ``RunLoadError`` with a one-line message (missing folder, a folder that is
not a run, no usable record) or a warning (a truncated last line, records without a
schema version or of a newer one, an empty run next to usable ones) and the rest of the
data. Records are read as today's schema (``harness.core.schema.upgrade``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from harness.core import schema
from harness.core.record import SCHEMA_VERSION
from harness.core.store import StoreError, read_records
from harness.report.units import as_float

# The record's columns come from the schema (harness.core.schema): numbers (stored as
# numbers, or as "nan"/"inf" strings for non-finite floats) are coerced so that pandas
# sees floats and NaN, never strings; per-step lists hold floats; the axes sort and group.
_SCHEMA_COLUMNS = {"NUMERIC_FIELDS": schema.numeric_fields, "LIST_FIELDS": schema.list_fields, "AXES": schema.axes}


def __getattr__(name: str) -> Any:
    # Read from the schema on each access, so a field declared later (a test's) counts.
    if name in _SCHEMA_COLUMNS:
        return _SCHEMA_COLUMNS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RunLoadError(StoreError):
    """A run folder (or results file) that cannot be used at all."""


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about itself."""

    path: str
    run_id: str
    env: dict[str, Any] = field(default_factory=dict)
    commands: tuple[str, ...] = ()
    n_records: int = 0
    device_label: str = "?"
    gpu_model: str = "?"  # the GPU model its cells ran on ("cpu" for CPU runs)
    digest: str = ""  # of results.jsonl: the same run copied to two places is read once


@dataclass(frozen=True, eq=False)
class RunSet:
    """Loaded runs: ``cells`` (one row per run and cell), ``records`` (every record)."""

    cells: pd.DataFrame
    records: pd.DataFrame
    runs: tuple[RunInfo, ...]
    warnings: tuple[str, ...] = ()


def resolve_results(path: str | os.PathLike) -> Path:
    """A run folder or a results.jsonl file -> the results file (or a one-line error)."""
    p = Path(path)
    if not p.exists():
        raise RunLoadError(f"{p}: no such run folder or file")
    if p.is_dir():
        if not (p / "results.jsonl").is_file():
            raise RunLoadError(f"{p} is not a run folder (no results.jsonl)")
        return p / "results.jsonl"
    return p


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path}: unreadable ({exc}); ignored")
        return {}
    return data if isinstance(data, dict) else {}


def read_run(path: str | os.PathLike) -> tuple[RunInfo, list[dict[str, Any]], list[str]]:
    """One run: its info, its usable records in file order, and warnings."""
    results = resolve_results(path)
    folder = results.parent
    try:
        raw, notes = read_records(results)
    except OSError as exc:
        raise RunLoadError(f"{results}: cannot read ({exc.strerror or exc})") from None
    records, skipped, unversioned = [], 0, 0
    for rec in raw:
        if not rec.get("cell_id") or not rec.get("status"):
            skipped += 1
            continue
        # Versioned records are upgraded on reading (iter_records; a newer version is
        # flagged there); records from before versions were written may lack anything.
        unversioned += schema.record_version(rec) == 0
        records.append(rec)
    if skipped:
        notes.append(f"{results}: {skipped} record(s) without a cell id or status skipped")
    if unversioned:
        notes.append(f"{results}: {unversioned} record(s) of no schema version (older than 1); this harness writes "
                     f"version {SCHEMA_VERSION}: fields they lack are shown as blank")
    env = _read_json(folder / "env.json", notes)
    meta = _read_json(folder / "run.json", notes)
    commands = tuple(str(i.get("command")) for i in meta.get("invocations", []) if isinstance(i, dict) and i.get("command"))
    run_id = str(meta.get("run_id") or (records[0].get("run_id") if records else None) or folder.name)
    info = RunInfo(path=str(folder), run_id=run_id, env=env, commands=commands, n_records=len(records),
                   device_label=_run_device_label(env, records), gpu_model=_run_gpu_model(env, records),
                   digest=_digest(results))
    return info, records, notes


def _digest(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def gpu_model_of(rec: dict[str, Any], default: str = "?") -> str:
    """The GPU model a record's cell ran on: the worker's CUDA device name, ``cpu`` for a
    CPU cell; for a cell that never reported a device (pruned, unsupported, crashed),
    the record's ``gpu_name`` (the host's GPU), else ``default`` (the run's)."""
    if rec.get("device") == "cuda" and (rec.get("device_name") or rec.get("gpu_name")):
        return str(rec.get("device_name") or rec.get("gpu_name"))
    if rec.get("device") == "cpu":
        return "cpu"
    if rec.get("gpu_name"):
        return str(rec["gpu_name"])
    return default


def _run_gpu_model(env: dict[str, Any], records: list[dict[str, Any]]) -> str:
    for rec in records:
        if rec.get("device") in ("cuda", "cpu"):
            return gpu_model_of(rec)
    if env.get("device") == "cuda" and env.get("gpu_name"):
        return str(env["gpu_name"])
    named = [r["gpu_name"] for r in records if r.get("gpu_name")]
    if named:
        return str(named[0])
    return "cpu" if env.get("device") == "cpu" else "?"


def _run_device_label(env: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The device a run's cells ran on: from its records where they say, else env.json."""
    for rec in records:
        if rec.get("device") == "cuda" and rec.get("device_name"):
            return str(rec["device_name"])
        if rec.get("device") == "cpu":
            return f"CPU ({rec.get('hostname') or env.get('hostname') or '?'})"
    if env.get("device") == "cuda" and env.get("gpu_name"):
        return str(env["gpu_name"])
    return f"CPU ({env.get('hostname') or '?'})"


def _device_total(env: dict[str, Any]) -> float | None:
    for key in ("nvml_gpus", "devices"):
        for d in env.get(key) or []:
            if isinstance(d, dict) and d.get("memory_total_bytes"):
                return float(d["memory_total_bytes"])
    return None


def _row(rec: dict[str, Any], info: RunInfo, index: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in rec.items():
        row[k] = v
        if k == "grad_ckpt_evidence" and isinstance(v, dict):  # numeric evidence is comparable: flatten it
            row.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, (dict, list))})
    for k in schema.list_fields():
        vals = rec.get(k)
        row[k] = [x for x in (as_float(v) for v in vals)] if isinstance(vals, list) else []
    row["run_dir"] = info.path
    row["run_id"] = rec.get("run_id") or info.run_id
    row["record_index"] = index
    own = rec.get("device")
    row["device_label"] = (str(rec.get("device_name")) if own == "cuda" and rec.get("device_name")
                           else f"CPU ({rec.get('hostname') or info.env.get('hostname') or '?'})" if own == "cpu"
                           else info.device_label)
    row["gpu_model"] = gpu_model_of(rec, info.gpu_model)  # a dimension of merged runs
    if row.get("device_total_bytes") is None and not row["device_label"].startswith("CPU"):
        row["device_total_bytes"] = _device_total(info.env)
    return row


def records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> a frame with the schema's columns always present and numbers as floats."""
    df = pd.DataFrame(rows)
    numeric = schema.numeric_fields()
    missing: dict[str, Any] = {}
    for col in ("cell_id", "status", "error", *schema.axes(), *numeric, *schema.list_fields(), "device_label",
                "gpu_name", "gpu_model", "hostname", "timestamp", "memory_metric", "device"):
        if col not in df.columns:
            missing[col] = None
    if missing:  # at once: one insert per column fragments the frame
        df = pd.concat([df, pd.DataFrame(missing, index=df.index)], axis=1)
    conv = numeric + tuple(c for c in df.columns if c.startswith("grad_ckpt_evidence."))
    df = df.assign(**{col: pd.to_numeric(df[col].map(as_float), errors="coerce") for col in conv}).copy()
    df["schema_version"] = df["schema_version"].fillna(0)
    df["status"] = df["status"].astype(str)
    # The peak memory a reader cares about: VRAM on a GPU, resident memory on a CPU host.
    vram = df["peak_vram_bytes"]
    df["memory_kind"] = vram.notna().map({True: "VRAM", False: "RSS"})
    df.loc[df["device_label"].astype(str).str.startswith("CPU"), "memory_kind"] = "RSS"
    df["memory_bytes"] = vram.where(df["memory_kind"] == "VRAM", df["peak_rss_bytes"])
    df["tokens_per_step"] = df["seq_len"] * df["batch_size"].fillna(1)
    return df.copy()  # one block per dtype again after the column-by-column conversions


def latest_per_cell(records: pd.DataFrame) -> pd.DataFrame:
    """The last record of each (run, cell), with ``attempts`` = records of that cell."""
    if records.empty:
        return records.assign(attempts=pd.Series(dtype=int))
    keys = ["run_dir", "cell_id"]
    attempts = records.groupby(keys)["record_index"].transform("size")
    out = records.assign(attempts=attempts).sort_values(keys[:1] + ["record_index"])
    out = out.drop_duplicates(keys, keep="last")
    return out.sort_values(["device_label", "model", "precision", "grad_ckpt", "batch_size", "seq_len", "run_dir"],
                           key=_sort_key).reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    """Precisions and checkpointing modes in the harness's order, not alphabetically."""
    from harness.core.axes import GRAD_CKPT_MODES, PRECISIONS

    if col.name == "precision":
        return col.map(lambda p: PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS))
    if col.name == "grad_ckpt":
        return col.map(lambda g: GRAD_CKPT_MODES.index(g) if g in GRAD_CKPT_MODES else len(GRAD_CKPT_MODES))
    return col.astype(str) if col.dtype == object else col


def expand_run_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[str | os.PathLike], list[str]]:
    """Run folders from what people pass (runs collected from many hosts).

    - a glob pattern the shell did not expand (quoted: ``'/shared/lora-runs/*'``): its
      matches;
    - a folder that is not a run but holds run folders (``/shared/lora-runs``): those, by
      name (one level down; a folder with results.jsonl is a run);
    - among the matches of a pattern or a collection, entries that are not runs (a README,
      a half-synced folder) are skipped with a note; a path given by name that is not a
      run is still an error.
    """
    import glob as globmod

    out: list[str | os.PathLike] = []
    notes: list[str] = []
    for p in paths:
        text = str(p)
        if not os.path.exists(text) and globmod.has_magic(text):
            matches = sorted(globmod.glob(text))
            runs = [m for m in matches if Path(m, "results.jsonl").is_file()]
            if not runs:
                raise RunLoadError(f"{text}: matches no run folder")
            if len(runs) < len(matches):
                notes.append(f"{text}: {len(matches) - len(runs)} match(es) without results.jsonl skipped")
            out += runs
            continue
        d = Path(text)
        if d.is_dir() and not (d / "results.jsonl").is_file():
            runs = sorted(c for c in d.iterdir() if (c / "results.jsonl").is_file())
            if runs:
                notes.append(f"{d}: a folder of {len(runs)} run folder(s); all read")
                out += [str(r) for r in runs]
                continue
        out.append(p)
    return out, notes


def load_run_set(paths: Sequence[str | os.PathLike]) -> RunSet:
    """Load run folders (or results.jsonl files). A path that is missing or not a run is
    an error; a run without usable records is a warning while others have some."""
    if not paths:
        raise RunLoadError("no run folder given")
    paths, notes = expand_run_paths(paths)
    infos, rows = [], []
    seen: set[str] = set()
    digests: dict[str, str] = {}
    for p in paths:
        info, recs, run_notes = read_run(p)
        notes += run_notes
        if info.path in seen:
            notes.append(f"{info.path} given twice; read once")
            continue
        seen.add(info.path)
        if info.digest and info.digest in digests:  # a run synced to two places
            notes.append(f"{info.path} holds the same records as {digests[info.digest]} (a copy); read once")
            continue
        if info.digest:
            digests[info.digest] = info.path
        if not recs:
            notes.append(f"{info.path}/results.jsonl holds no usable records; left out")
            continue
        infos.append(info)
        rows += [_row(r, info, i) for i, r in enumerate(recs)]
    if not rows:
        where = ", ".join(str(p) for p in paths)
        raise RunLoadError(f"{where}: no usable records (results.jsonl is empty or unreadable)")
    records = records_frame(rows)
    return RunSet(cells=latest_per_cell(records), records=records, runs=tuple(infos), warnings=tuple(notes))


def load_runs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per cell and run folder, units as stored; the device is ``device_label``
    (the GPU model, or ``CPU (<host>)``). Warnings are issued as ``UserWarning``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rs = load_run_set(list(paths))
    for note in rs.warnings:
        warnings.warn(note, stacklevel=2)
    return rs.cells
