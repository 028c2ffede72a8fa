"""The result record's schema: every field a record can hold, declared once, as data.

Pure module (no torch, no pandas). The field list lives in ``schema_fields``,
``schema_fields_more`` and ``schema_fields_stack``; everything that used to list record
fields by hand derives from it: the fields every record carries
(``harness.core.record.RECORD_FIELDS``), the report frame's numeric and list columns and
axes (``harness.report.load``), pytest-benchmark's
``extra_info`` (the pytest plugin), compare's metrics, the display units
(``harness.report.units``), the report's "More metrics" table and
``docs/results-schema.md`` (``python -m harness.core.schema_doc > docs/results-schema.md``).

Adding a metric is one ``Field`` entry plus the line in the worker that measures it.

Reading older records: ``upgrade(record)`` fills what a record written before a field
existed lacks with the field's declared default and re-reads its ``spec`` through
``CellSpec`` so settings added later (``spec.lora.input_cast``, ``spec.window``) get
today's defaults. Every reader goes through it (``harness.core.store.iter_records``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator

from harness.core import schema_fields, schema_fields_more, schema_fields_stack
from harness.core.field import GROUPS, SCHEMA_VERSION, TYPES, Field  # noqa: F401 - the schema's API

_REGISTRY: dict[str, Field] = {}


def register(*new: Field, replace: bool = False) -> None:
    """Declare fields (the schema modules do this at import; a test may add its own)."""
    for f in new:
        if f.name in _REGISTRY and not replace:
            raise ValueError(f"field {f.name} is declared twice")
        _REGISTRY[f.name] = f


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def registered(*new: Field) -> Iterator[None]:
    """The fields declared for the duration of a ``with`` block (tests)."""
    register(*new)
    try:
        yield
    finally:
        for f in new:
            unregister(f.name)


def fields() -> tuple[Field, ...]:
    return tuple(_REGISTRY.values())


def get(name: str) -> Field | None:
    return _REGISTRY.get(name)


def top_level() -> tuple[Field, ...]:
    return tuple(f for f in fields() if not f.nested)


def _names(pred) -> tuple[str, ...]:
    return tuple(f.name for f in top_level() if pred(f))


# -- derivations -------------------------------------------------------------------------

def record_fields() -> tuple[str, ...]:
    """Fields every record carries (null where the cell did not measure them)."""
    return _names(lambda f: f.always)


def axes() -> tuple[str, ...]:
    """The matrix axes copied from the spec onto every record."""
    return _names(lambda f: f.group == "axes")


def numeric_fields() -> tuple[str, ...]:
    """Top-level numbers (stored as numbers, or "nan"/"inf" strings when not finite)."""
    return _names(lambda f: f.numeric)


def list_fields() -> tuple[str, ...]:
    """Lists of numbers with one entry per step (losses, step times)."""
    return _names(lambda f: f.per == "step")


def metric_fields() -> tuple[str, ...]:
    return _names(lambda f: f.metric)


def non_metric_numbers() -> tuple[str, ...]:
    """Numbers that describe a cell rather than measure it (its length, a process id)."""
    return _names(lambda f: f.numeric and not f.metric)


def step_metrics() -> tuple[str, ...]:
    return _names(lambda f: f.step_band)


def bench_fields() -> tuple[str, ...]:
    return _names(lambda f: f.bench)


def table_fields() -> tuple[Field, ...]:
    return tuple(f for f in top_level() if f.table)


def children(parent: str) -> tuple[Field, ...]:
    """Declared keys of an object field (``grad_ckpt_evidence`` -> its ``.mode`` etc.)."""
    return tuple(f for f in fields() if f.name.startswith(parent + ".") and "." not in f.name[len(parent) + 1:])


def undeclared(record: dict[str, Any]) -> list[str]:
    """Keys of ``record`` (and of its objects whose keys are declared) the schema lacks."""
    out = []
    for key, value in record.items():
        f = get(key)
        if f is None:
            out.append(key)
        elif isinstance(value, dict) and children(key):
            out += [f"{key}.{k}" for k in value if get(f"{key}.{k}") is None]
    return out


# -- reading older records ---------------------------------------------------------------

def record_version(record: dict[str, Any]) -> int:
    """The record's schema version; 0 for records from before versions were written."""
    v = record.get("schema_version")
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def is_newer(record: dict[str, Any]) -> bool:
    return record_version(record) > SCHEMA_VERSION


def upgrade_spec(spec: Any) -> Any:
    """A stored spec with today's defaults for settings added after it was written; a spec
    ``CellSpec`` cannot read (hand-made, or from a newer harness) is returned as it is."""
    if not isinstance(spec, dict):
        return spec
    from harness.core.errors import SpecError
    from harness.core.spec import CellSpec

    try:
        return CellSpec.from_dict(spec).to_dict()
    except (SpecError, TypeError, ValueError, AttributeError):
        return spec


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record as this version of the schema reads it (a new dict; the input is unchanged).

    Fields every record carries that it lacks get their default; so do fields introduced
    after the record's version (version 0, from before versions were written, reads as
    1: version 1 is where the declared fields start). Conditional fields stay absent, as
    they are in a record of today when they do not apply. The ``spec`` is normalised
    (``upgrade_spec``). A record of a newer version than this harness is returned
    unchanged: the reader flags it (``newer_note``).
    """
    if is_newer(record):
        return record
    version = max(1, record_version(record))
    out = dict(record)
    for f in top_level():
        if f.name not in out and (f.always or f.since > version):
            out[f.name] = copy.deepcopy(f.default)
    if "spec" in out:
        out["spec"] = upgrade_spec(out["spec"])
    return out


_NON_FINITE = ("nan", "inf", "-inf")


def _type_ok(f: Field, value: Any) -> bool:
    if value is None:
        return True
    if f.type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if f.type == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in _NON_FINITE
    if f.type == "str":
        return isinstance(value, str)
    if f.type == "bool":
        return isinstance(value, bool)
    if f.type == "list":
        return isinstance(value, list)
    return isinstance(value, dict)


def check_types(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The record with every declared top-level field of the wrong type read as blank
    (null), and one line per such field. A damaged value never reaches a table or a
    comparison as if it were a measurement."""
    problems, out = [], record
    for key, value in record.items():
        f = _REGISTRY.get(key)
        if f is None or f.nested or _type_ok(f, value):
            continue
        if out is record:
            out = dict(record)
        out[key] = None
        problems.append(f"{key} is {value!r}, not {'a number' if f.type in ('int', 'float') else 'a ' + f.type}: "
                        "read as blank")
    return out, problems


def newer_note(where: str, versions: dict[int, int]) -> str:
    """The warning for records a newer harness wrote: kept, read as they are."""
    parts = ", ".join(f"{n} of schema version {v}" for v, n in sorted(versions.items()))
    return (f"{where}: {parts}: newer than this harness (version {SCHEMA_VERSION}); kept and read as they are "
            "(fields this version does not know are not interpreted)")


def newer_versions(records: Iterable[dict[str, Any]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in records:
        if is_newer(r):
            counts[record_version(r)] = counts.get(record_version(r), 0) + 1
    return counts


register(*schema_fields.FIELDS, *schema_fields_more.FIELDS, *schema_fields_stack.FIELDS)
