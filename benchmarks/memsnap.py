"""Reading ``torch.cuda.memory._snapshot()`` (torch 2.1+; unchanged through 2.11): which
Python frames allocated the memory that is live at a given moment. Pure functions over
the snapshot's dictionaries (no torch); used by ``benchmarks/int8_memory.py``.

The snapshot's shape (``torch/cuda/memory.py``, ``_snapshot``): ``segments`` (each with
``device``, ``blocks``: ``size``, ``state`` ``active_allocated`` / ``active_awaiting_free``
/ ``inactive``, ``frames``) and ``device_traces`` (one list per device of entries with
``action`` ``alloc`` / ``free_requested`` / ``free_completed`` / ``segment_*`` / ``oom`` /
``snapshot``, ``addr``, ``size``, ``frames``). Frames are innermost first, each
``{filename, line, name}``. The allocator's ``allocated`` figure rises at ``alloc`` and
falls at ``free_requested``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

BEFORE = "(allocated before recording: weights, optimizer state, ...)"
NO_FRAME = "(no Python frame recorded)"


def short_path(path: str) -> str:
    """A file path from its package down: ``bitsandbytes/autograd/_functions.py``."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    for top in ("harness/", "benchmarks/", "torch/"):
        i = path.rfind("/" + top)
        if i >= 0:
            return path[i + 1:]
    return "/".join(path.split("/")[-2:])


def phase_of(frames: list[dict[str, Any]]) -> str:
    """Where in the step: ``forward``, ``recompute`` (checkpointing, in the backward
    pass), ``backward`` or ``optimizer``."""
    files = [f.get("filename", "") for f in frames]
    if any("/torch/optim/" in f for f in files):
        return "optimizer"
    backward = any(f.endswith("torch/autograd/__init__.py") or f.endswith("torch/autograd/graph.py") for f in files)
    if backward and any(f.endswith("torch/utils/checkpoint.py") for f in files):
        return "recompute"
    return "backward" if backward else "forward"


def frame_signature(frames: list[dict[str, Any]]) -> str:
    """The innermost frame outside torch's own package (the library or model line that
    asked for the memory), ``path:line function``; torch's innermost if all are torch's."""
    if not frames:
        return NO_FRAME
    for f in frames:
        path = f.get("filename", "")
        if "/torch/" not in path and not path.startswith("<"):
            return f"{short_path(path)}:{f.get('line')} {f.get('name')}"
    f = frames[0]
    return f"{short_path(f.get('filename', ''))}:{f.get('line')} {f.get('name')}"


def group(blocks: Iterable[tuple[int, list[dict[str, Any]]]], top: int) -> list[dict[str, Any]]:
    """(bytes, frames) pairs grouped by (signature, phase), largest first, ``top`` of them."""
    acc: dict[tuple[str, str], list[int]] = {}
    for size, frames in blocks:
        key = (frame_signature(frames), phase_of(frames) if frames else "-")
        entry = acc.setdefault(key, [0, 0])
        entry[0] += int(size)
        entry[1] += 1
    rows = [{"frame": k[0], "phase": k[1], "bytes": v[0], "blocks": v[1]} for k, v in acc.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def live_at_peak(trace: list[dict[str, Any]], base_allocated: int, top: int = 15) -> dict[str, Any]:
    """Replay a device's trace from the moment recording began (when ``base_allocated``
    bytes were allocated): the peak of the allocated figure, and the blocks live then,
    grouped by frame. Blocks allocated before recording (no alloc entry) count as one
    row, less those the trace saw freed before the peak."""
    cur = peak = int(base_allocated)
    peak_at = -1
    for i, e in enumerate(trace):
        if e.get("action") == "alloc":
            cur += int(e["size"])
        elif e.get("action") == "free_requested":
            cur -= int(e["size"])
        if cur > peak:
            peak, peak_at = cur, i
    live: dict[int, tuple[int, list]] = {}
    freed_before = 0
    for e in trace[:peak_at + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = (int(e["size"]), e.get("frames") or [])
        elif e.get("action") == "free_requested":
            if e["addr"] in live:
                del live[e["addr"]]
            else:
                freed_before += int(e["size"])
    rows = group(live.values(), top)
    before = int(base_allocated) - freed_before
    rows.append({"frame": BEFORE, "phase": "-", "bytes": before, "blocks": None})
    rows.sort(key=lambda r: -r["bytes"])
    actions: dict[str, int] = {}
    for e in trace:
        actions[e.get("action", "?")] = actions.get(e.get("action", "?"), 0) + 1
    return {"peak_allocated_bytes": peak, "peak_entry": peak_at, "entries": len(trace), "actions": actions,
            "live_blocks_recorded": len(live), "top": rows[:top + 1]}


def live_blocks(segments: list[dict[str, Any]], device: int | None = None) -> list[tuple[int, list]]:
    """(bytes, frames) of every block in use (``active_allocated``) in the segments."""
    out = []
    for seg in segments:
        if device is not None and seg.get("device", device) != device:
            continue
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = b.get("frames")
            if frames is None:  # older snapshots kept them in the block's history
                hist = b.get("history") or []
                frames = hist[0].get("frames", []) if hist else []
            out.append((int(b.get("requested_size") or b.get("size") or 0), frames))
    return out


def collapse_layers(name: str) -> str:
    """``model.layers.12.mlp`` -> ``model.layers.*.mlp``: one row for all decoder layers."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)
