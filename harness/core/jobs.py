"""What a launcher and the worker processes it starts agree on, beyond the job's JSON:
where each rank of a torchrun cell leaves its record and its pid. Pure module."""

from __future__ import annotations


def rank_file(prefix: str, rank: int, kind: str = "json") -> str:
    """Where rank ``rank`` writes its record (``json``) or its pid (``pid``)."""
    return f"{prefix}.rank{rank}.{kind}"
