"""One record field, declared as data: its type, unit, group, the schema version it
appeared in and its default for older records. Pure module; the fields themselves are
in ``schema_fields`` and ``schema_fields_more``, the schema's functions in ``schema``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2

TYPES: tuple[str, ...] = ("int", "float", "str", "bool", "list", "object")
# Groups in the order the documentation shows them.
GROUPS: tuple[str, ...] = ("identity", "axes", "outcome", "speed", "compute", "energy", "memory", "budget",
                           "phases", "load", "precision", "loss", "proofs", "stack", "inputs", "vlm", "host",
                           "gpu-pool", "ray", "dist", "quality")


@dataclass(frozen=True)
class Field:
    """One record field.

    ``type``: int, float, str, bool, list or object (a JSON object). ``unit``: what a
    number is counted in (bytes, s, s/step, J, J/token, tokens/s, fraction, ...; None
    for non-numbers). ``since``: the schema version that introduced it; ``default``:
    what a record older than that reads as (and what an ``always`` field holds when a
    cell never measured it). ``always``: on every record, whatever the outcome.
    ``metric``: a comparable measurement (``better``: "higher" or "lower" when a
    direction is obviously better). ``bench``: copied into pytest-benchmark's
    ``extra_info``. ``table``: its column header in the report's "More metrics" table
    (None: not there). ``per``: for lists, what one entry stands for ("step": one per
    step; "rank": one per torchrun rank). ``step_band``: compare reads a noise band for
    it from the record's per-step times. A dotted name (``grad_ckpt_evidence.mode``)
    is a key inside an object field.
    """

    name: str
    type: str
    unit: str | None
    group: str
    doc: str
    since: int = 1
    default: Any = None
    always: bool = False
    metric: bool = False
    better: str | None = None
    bench: bool = False
    table: str | None = None
    per: str | None = None
    step_band: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"field {self.name}: type {self.type!r} is not one of {', '.join(TYPES)}")
        if self.group not in GROUPS:
            raise ValueError(f"field {self.name}: group {self.group!r} is not one of {', '.join(GROUPS)}")
        if self.better not in (None, "higher", "lower"):
            raise ValueError(f"field {self.name}: better must be 'higher', 'lower' or None")
        if self.metric and self.type not in ("int", "float"):
            raise ValueError(f"field {self.name}: a metric must be a number")
        if self.per not in (None, "step", "rank") or (self.per and self.type != "list"):
            raise ValueError(f"field {self.name}: per is 'step' or 'rank', for lists only")
        if not 1 <= self.since <= SCHEMA_VERSION:
            raise ValueError(f"field {self.name}: since {self.since} is not a schema version (1..{SCHEMA_VERSION})")

    @property
    def nested(self) -> bool:
        return "." in self.name

    @property
    def numeric(self) -> bool:
        return self.type in ("int", "float") and not self.nested
