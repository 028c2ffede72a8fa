"""The figures and tables of ``benchmarks/interleaved.py`` from what its sides reported.
Pure (no torch, no harness imports)."""

from __future__ import annotations

import statistics
from typing import Any

import protocol

# (key, side A, side B, target, label): B against A, per round
PAIRS = (("harness_vs_bare", "bare", "harness", "ratio >= 0.97", "harness / bare tokens/s"),
         ("sampler_cost", "harness-nvml-off", "harness", "cost < 1%", "sampler on / off tokens/s"))
MEMORY_TARGET = "within 1%"
SIDE_FIELDS = ("status", "error", "torch_peak_allocated_bytes", "torch_peak_reserved_bytes", "peak_vram_bytes",
               "memory_sampler", "cell_id", "measured_steps", "window_rule", "step_gate")

SAME_LOSS_REL = 0.001  # losses within 0.1% of the bare loop's count as the same


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def alternation(reports: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Did the sides really take turns? No two steps overlap in time (``t0``/``t1`` on the
    system-wide monotonic clock), and the round steps ran in the scheduled order."""
    by_time = sorted(reports, key=lambda r: r["t0"])
    overlaps = sum(1 for p, q in zip(by_time, by_time[1:]) if q["t0"] < p["t1"])
    done = {e["round"] for e in rounds}  # a round cut short (a failure, an interrupt) is not judged
    seen = [r["side"] for r in by_time if r.get("phase") == "round" and r.get("round") in done]
    planned = [name for e in rounds for name in e["order"] for _ in e["times"].get(name, [])]
    return {"steps": len(by_time), "overlapping_steps": overlaps, "order_as_scheduled": seen == planned,
            "ok": overlaps == 0 and seen == planned}


def _losses(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Largest relative difference of each harness side's losses from the bare loop's."""
    base = results.get("bare", {}).get("losses") or []
    out = {}
    for name, res in results.items():
        other = res.get("losses") or []
        n = min(len(base), len(other))
        if name == "bare" or not n:
            continue
        rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(base[:n], other[:n])]
        # after many steps two runs of non-deterministic kernels train apart (one spike makes
        # the largest difference huge): how long they stay together says more
        same = next((i for i, r in enumerate(rel) if r > SAME_LOSS_REL), n)
        out[name] = {"compared": n, "max_rel_diff": max(rel), "same_for_steps": same}
    return out


def _side(name: str, res: dict[str, Any], rounds, reports, tokens: int, busy, nvml_busy) -> dict[str, Any]:
    times = [t for e in rounds for t in e["times"].get(name, [])]
    med = statistics.median(times) if times else None
    first = [r["dt"] for r in reports if r["side"] == name and r.get("phase") == "round" and r.get("pos") == 0]
    later = [r["dt"] for r in reports if r["side"] == name and r.get("phase") == "round" and r.get("pos", 0) > 0]
    out = {k: res.get(k) for k in SIDE_FIELDS if k in res}
    out.update({"status": res.get("status"), "round_steps": len(times), "median_step_s": med,
                "tokens_per_s": tokens / med if med else None, "mean_first_step_of_turn_s": _mean(first),
                "mean_later_steps_of_turn_s": _mean(later), "busy_profiled": busy, "busy_nvml": nvml_busy})
    return out


def analyse_cell(cell: str, tokens_per_step: int, a, state: dict[str, Any], results: dict[str, dict[str, Any]],
                 busy: dict[str, Any], nvml_busy: dict[str, Any]) -> dict[str, Any]:
    rounds = [e for e in state["rounds"] if all(e["times"].get(n) for n in results)]
    per_round = {n: [statistics.fmean(e["times"][n]) for e in rounds] for n in results}
    comps: dict[str, Any] = {}
    for key, side_a, side_b, target, label in PAIRS:
        if side_a in results and side_b in results:
            c = protocol.compare(per_round[side_a], per_round[side_b], target).to_dict()
            comps[key] = dict(c, label=label, a=side_a, b=side_b)
    bare = results.get("bare", {}).get("torch_peak_allocated_bytes")
    harness = results.get("harness", {}).get("torch_peak_allocated_bytes")
    ratio = harness / bare if bare and harness else None
    comps["torch_peak_allocated"] = {
        "label": "harness / bare torch peak allocated", "target": MEMORY_TARGET, "n": 1 if ratio else 0,
        "geomean_ratio": ratio, "ci": None, "half_width": None, "rounds_to_decide": None, "bare_bytes": bare,
        "harness_bytes": harness, "verdict": protocol.point_verdict(ratio, protocol.parse_target(MEMORY_TARGET))
        or "n/a (no allocator peak: not a CUDA run)"}
    return {"cell": cell, "rounds": len(rounds), "steps_per_turn": a.steps_per_turn, "order": a.order,
            "stopped": state["stopped"], "error": state["error"], "comparisons": comps,
            "sides": {n: _side(n, r, rounds, state["reports"], tokens_per_step, busy.get(n), nvml_busy.get(n))
                      for n, r in results.items()},
            "alternation": alternation(state["reports"], state["rounds"]), "losses_vs_bare": _losses(results),
            "round_times": state["rounds"], "reports": state["reports"]}


def _f(x, fmt: str = "{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _busy(b: dict[str, Any] | None) -> str:
    if not b:
        return "n/a"
    if b.get("busy_fraction") is None:
        return f"n/a ({b.get('reason')})"
    extra = f", {b['kernels']} kernels, median {b['median_kernel_us']:.1f} us" if b.get("kernels") is not None else ""
    return f"{b['busy_fraction']:.1%}{extra}"


def _cell_md(c: dict[str, Any]) -> list[str]:
    lines = [f"## {c['cell']}", ""]
    if c.get("skipped"):
        return lines + [f"Not run: {c['skipped']}.", ""]
    stop = f"; stopped by the {c['stopped']}" if c.get("stopped") else ""
    lines += [f"{c['rounds']} rounds of {c['steps_per_turn']} steps per side per turn (order {c['order']}){stop}. "
              f"Turns never overlapped and ran as scheduled: {'yes' if c['alternation']['ok'] else 'NO'}.", ""]
    if c.get("error"):
        lines += [f"**Incomplete**: {c['error']}", ""]
    lines += ["| comparison | target | rounds | ratio (geometric mean) | 95% CI | noise | verdict | rounds to decide |",
              "|---|---|---|---|---|---|---|---|"]
    for comp in c["comparisons"].values():
        ratio, ci, noise, verdict, need = protocol.fmt_comparison(comp)
        if comp.get("ci") is None and comp["n"] == 1:
            ci, noise = "exact", "-"
        lines.append(f"| {comp['label']} | {comp['target']} | {comp['n']} | {ratio} | {ci} | {noise} | {verdict} | "
                     f"{need} |")
    lines += ["", "| side | status | median step (rounds) | tokens/s | first / later step of a turn | torch peak "
                  "allocated | GPU busy (profiled step) | GPU busy (NVML) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in c["sides"].items():
        peak = s.get("torch_peak_allocated_bytes")
        lines.append(f"| {name} | {s['status']}{' (' + str(s['error'])[:80] + ')' if s.get('error') else ''} | "
                     f"{_f(s['median_step_s'], '{:.4f} s')} | {_f(s['tokens_per_s'], '{:,.0f}')} | "
                     f"{_f(s['mean_first_step_of_turn_s'], '{:.4f}')} / {_f(s['mean_later_steps_of_turn_s'], '{:.4f}')} s | "
                     f"{_f(peak / 2**30 if peak else None, '{:.2f} GiB')} | {_busy(s.get('busy_profiled'))} | "
                     f"{_busy(s.get('busy_nvml'))} |")
    for name, d in c["losses_vs_bare"].items():
        same = d.get("same_for_steps")
        together = ("the same at every step" if same == d["compared"] else
                    f"the same for the first {same} steps, then apart") if same is not None else ""
        lines.append(f"\nLosses, {name} vs bare ({d['compared']} steps): "
                     + (f"{together} (within {SAME_LOSS_REL:.1%}); " if together else "")
                     + f"largest relative difference {d['max_rel_diff']:.3g}.")
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Harness overhead by interleaved paired rounds", "", f"Host: {data['host']}.", "",
             "Per round each side ran its steps in turn (the others waiting at their gates, outside every timer); "
             "a round's ratio is side A's mean step time over side B's (B's throughput relative to A's). The 95% "
             "interval is Student's t on the rounds' log ratios (rounds assumed independent, log ratios normal); "
             "**met** / **missed**: the whole interval on the target's / the wrong side; **cannot tell**: the interval "
             "holds the target; *rounds to decide*: rounds needed for the interval to clear the target at the "
             "observed mean and spread. Torch peak allocated is one exact figure per side.", ""]
    for c in data["cells"]:
        lines += _cell_md(c)
    lines.append(f"Elapsed: {data['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"
