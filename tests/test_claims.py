"""The seed's claims: verdict rules on numbers, the GPU claims' cell logic against a fake
host, and the claims suite itself on the CPU with the tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fit import claims as C
from harness.fit import claims_run as claimsrun
from harness.fit import search as fitrun
from harness.core import evidence as E
from harness.core.budget import GIB
from harness.core.errors import SpecError
from harness.core.spec import CellSpec
from tests.fakes import FakeHost

ROOT = Path(__file__).resolve().parent.parent


REF = ROOT / "reports" / "reference" / "h200-fit-claims-2026-11-29"


def _h200(claim):
    """The H200 reference run's numbers for a claim (8B, s2048, gc-offload, 7 steps, one seed)."""
    return next(v for v in json.loads((REF / "claims.json").read_text()) if v["claim"] == claim)["numbers"]


def _h200_step_spread():
    recs = [json.loads(x) for x in (REF / "results.jsonl").read_text().splitlines()]
    return {r["precision"]: [E.step_time_spread(r["step_times_s"])] for r in recs
            if r["cell_id"].endswith("/s2048/gc-offload/load-pretrained")}


def test_vram_between():
    # two seeds a side (one changes the measured peaks by a few MiB)
    two = {"fp32": [40 * GIB, 40.002 * GIB], "bf16": [21 * GIB, 21.002 * GIB], "int8": [19 * GIB, 19.002 * GIB]}
    assert C.judge_vram_between(two).verdict == C.HOLDS
    v = C.judge_vram_between(dict(two, int8=[25 * GIB, 25.002 * GIB]))
    assert v.verdict == C.REFUTED and "int8 25.00 GiB > bf16 21.00 GiB" in v.summary and not v.passed
    assert "difference" in v.margin and "noise" in v.margin and v.margin.endswith("-> refuted")


def test_one_seed_decides_no_comparison():
    """One seed measures no noise: the H200 reference run's comparisons (one seed) are
    inconclusive, whatever their size, and say why."""
    v = C.judge_vram_between(_h200("vram-between")["nvml_peak_bytes"], "s2048 gc-offload", "offload")
    assert v.verdict == C.INCONCLUSIVE and "one seed: no repeat spread" in v.margin


def test_faster():
    assert C.judge_faster({"bf16": [5800.0, 5790.0], "int8": [2500.0, 2510.0], "nf4": [4500.0, 4490.0]}).verdict \
        == C.HOLDS
    v = C.judge_faster({"bf16": [763.0, 765.0], "int8": [3065.0, 3060.0], "nf4": [2493.0, 2490.0]})
    assert v.verdict == C.REFUTED and "not faster than int8, nf4" in v.summary


def test_faster_inside_the_step_time_spread_is_inconclusive():
    """H200, s2048 gc-offload: bf16 4,461 vs nf4 4,038 tokens/s (9.5%) while nf4's own steps
    spread 18% (0.47-0.56 s): even two seeds that agree cannot call bf16 faster."""
    tps, spread = _h200("faster")["tokens_per_s"], _h200_step_spread()
    assert spread["nf4"][0] == pytest.approx(0.18, abs=0.005)
    two = {p: [x, x * 1.001] for p, x in tps.items()}
    v = C.judge_faster(two, "s2048 gc-offload, GPU", "offload", step_spread=spread)
    assert v.verdict == C.INCONCLUSIVE
    assert "bf16 4,463 vs nf4 4,040: difference 9.5% <= noise 18% (step-time spread of nf4)" in v.margin
    assert "bf16 4,463 vs int8 2,107: difference 53% > noise 26% (step-time spread of int8)" in v.margin
    assert C.judge_faster(tps, step_spread=spread).verdict == C.INCONCLUSIVE  # one seed: today's reference


def test_more_stable():
    ref = [11.8, 11.5, 11.0, 10.2]
    close = [x + 0.001 for x in ref]
    far = [x + 0.05 for x in ref]
    two = lambda c, d=0.0: [c, [x + d for x in c]]  # noqa: E731 - a second seed, shifted by d
    ok = C.judge_more_stable({"fp32": two(ref), "bf16": two(close), "int8": two(far), "nf4": two(far)})
    assert ok.verdict == C.HOLDS and ok.weights == "random weights (synthetic checkpoint)"
    v = C.judge_more_stable({"fp32": two(ref), "bf16": two(far), "int8": two(close), "nf4": two(far)})
    assert v.verdict == C.REFUTED and "int8 closer to fp32" in v.summary
    v = C.judge_more_stable({"fp32": ref, "bf16": ref[:3] + ["nan"], "int8": far, "nf4": far})
    assert v.verdict == C.REFUTED and v.numbers["nonfinite"]["bf16"] == 1  # non-finite: no noise needed
    v = C.judge_more_stable({"fp32": two(ref), "bf16": two(close), "int8": [["inf"] * 4] * 2, "nf4": two(far)})
    assert v.verdict == C.HOLDS and v.numbers["mean_abs_dev_from_fp32"]["int8"] is None
    assert C.judge_more_stable({"fp32": ["nan"] * 4, "bf16": ref, "int8": ref, "nf4": ref}).verdict == C.INCONCLUSIVE


def test_more_stable_h200_reference_is_inconclusive():
    """bf16 0.0223 vs int8 0.0214 mean |loss - fp32 loss| on 7 steps of one seed: 4% apart,
    with no noise measured. It was REFUTED; it is inconclusive, and with a second seed as
    far from the first as these two precisions' seeds scatter, still inside the noise."""
    losses = _h200("more-stable")["losses"]
    one = C.judge_more_stable(losses, "s2048 gc-offload", "offload")
    assert one.verdict == C.INCONCLUSIVE and "difference 4.0%, noise not measured (one seed" in one.margin
    # two seeds around the same medians, each side's seeds 0.002 apart (9% of bf16's deviation)
    ref = losses["fp32"]
    at = lambda d: [x + d for x in ref]  # noqa: E731 - a curve |d| from fp32's at every step
    two = C.judge_more_stable({"fp32": [ref, ref], "bf16": [at(0.0213), at(0.0233)], "int8": [at(0.0204), at(0.0224)],
                               "nf4": [at(0.1676), at(0.1686)]}, "s2048 gc-offload", "offload")
    assert two.verdict == C.INCONCLUSIVE and two.numbers["seeds"] == 2
    assert "bf16 0.0223 vs int8 0.0214: difference 4.0% <= noise 9.0% (repeat spread of 2 seeds)" in two.margin, \
        two.margin
    assert "bf16 0.0223 vs nf4 0.1681: difference 87% > noise" in two.margin
    md = C.markdown([two], "claims")
    assert "| inconclusive | bf16 0.0223 vs int8 0.0214: difference 4.0% <= noise 9.0% (repeat spread of 2 seeds)" in md
    assert "| random weights (synthetic checkpoint) |" in md


def test_extends_and_table():
    kw = dict(base_longest=4096, base_status="found", probe_len=4096, evidence="e")
    assert C.judge_extends("ckpt-extends", "gc-on", other_fits_beyond=False, **kw).verdict == C.HOLDS
    assert C.judge_extends("ckpt-extends", "gc-on", other_fits_beyond=True, **kw).verdict == C.REFUTED
    assert C.judge_extends("8bit-extends", "gc-offload", other_fits_beyond=True, **kw).verdict == C.HOLDS
    assert C.judge_extends("8bit-extends", "gc-offload", other_fits_beyond=None, **kw).verdict == C.ERROR
    assert C.judge_extends("8bit-extends", "x", other_fits_beyond=True, **dict(kw, base_status="at_cap")).verdict \
        == C.INCONCLUSIVE
    vs = [C.judge_faster({"bf16": [1.0, 1.0], "int8": [2.0, 2.0], "nf4": [3.0, 3.0]}, grad_ckpt="on"),
          C.skipped("fits-2048-24gb", "gc-off", "needs a GPU", "off")]
    md = C.markdown(vs, "claims")
    assert "**REFUTED**" in md and "skipped" in md and "1 refuted, 1 skipped" in md
    assert "| claim (../shared/SEED.md) | gc-off | gc-on | gc-offload |" in md
    assert "| 16-bit LoRA is usually faster than low-bit quantised training | - | **REFUTED** | - |" in md
    assert "| claim (../shared/SEED.md) | checkpointing | verdict | margin (difference vs noise) | weights |" in md
    assert json.loads(C.to_json(vs))[0]["verdict"] == "refuted" and json.loads(C.to_json(vs))[0]["grad_ckpt"] == "on"


def _fake_ctx(**kw):
    host = FakeHost()
    search = fitrun.FitSearch(fitrun.FitSettings((claimsrun.BUDGET_BYTES,), 256, 65536), measure=host,
                              out=lambda s: None)
    return host, claimsrun.ClaimsContext(CellSpec("llama-3.1-8b", "bf16", 512), host, search, use_gpu=True,
                                         device_total_bytes=140 * GIB, **kw)


def test_gpu_claims_logic_with_a_fake_host():
    host, ctx = _fake_ctx()
    search = ctx.search
    assert claimsrun.claim_vram_between(ctx, "offload").verdict == C.HOLDS
    assert claimsrun.claim_faster(ctx, "offload").verdict == C.HOLDS
    assert claimsrun.claim_more_stable(ctx, "offload").verdict == C.HOLDS
    # the four comparison cells x two seeds, shared by three claims
    assert len(host.calls) == 8 and {c.seed for c in host.calls} == {0, 1}
    assert {c.cell_id for c in host.calls if c.seed == 1} == {
        f"llama-3.1-8b/{p}/s2048/gc-offload/load-pretrained/seed1" for p in ("fp32", "bf16", "int8", "nf4")}
    off = claimsrun.claim_fits_2048(ctx, "off")
    assert off.verdict == C.REFUTED and "ran out of memory" in off.summary  # 15.5 + 16 GiB > 24 GiB
    assert claimsrun.claim_fits_2048(ctx, "offload").verdict == C.HOLDS
    n = len(host.calls)
    ext = claimsrun.claim_ckpt_extends(ctx, "on")
    assert ext.verdict == C.HOLDS and ext.numbers["base_longest"] > 2048
    # gc-off already failed at 2048 under 24 GiB: it fails at the longer length without a cell
    assert all(c.grad_ckpt == "on" for c in host.calls[n:])
    eight = claimsrun.claim_8bit_extends(ctx, "offload")
    assert eight.verdict == C.HOLDS and host.calls[-1].precision == "int8"
    assert host.calls[-1].seq_len == eight.numbers["base_longest"] + 256
    assert "GiB headroom" in eight.margin and "one 256-token step past bf16's longest" in eight.margin
    small = claimsrun.ClaimsContext(ctx.template, host, search, use_gpu=True, device_total_bytes=16 * GIB)
    assert claimsrun.claim_8bit_extends(small, "offload").verdict == C.SKIPPED
    cpu = claimsrun.ClaimsContext(ctx.template, host, search, use_gpu=False)
    assert "needs a GPU" in claimsrun.claim_vram_between(cpu, "offload").summary


def test_every_claim_is_judged_in_every_checkpointing_mode():
    """The verdicts differ by mode: int8 with gc-on keeps activations bf16 frees (the fake
    host's numbers follow the H200's), so with gc-on 16-bit's VRAM is not between fp32's
    and 8-bit's and 8-bit does not extend the length, while with gc-offload both hold."""
    from harness.core.axes import GRAD_CKPT_MODES

    _, ctx = _fake_ctx()
    verdicts = claimsrun.judge_all(ctx)
    assert {(v.claim, v.grad_ckpt) for v in verdicts} == {(k, m) for k in C.CLAIMS for m in GRAD_CKPT_MODES}
    by = {(v.claim, v.grad_ckpt): v for v in verdicts}
    assert by[("vram-between", "offload")].verdict == C.HOLDS
    assert by[("vram-between", "on")].verdict == C.REFUTED
    assert "int8 27.00 GiB > bf16 21.00 GiB" in by[("vram-between", "on")].summary
    assert by[("8bit-extends", "offload")].verdict == C.HOLDS
    assert by[("8bit-extends", "on")].verdict == C.REFUTED
    off = by[("ckpt-extends", "off")]
    assert off.verdict == C.SKIPPED and "gc-off is the mode" in off.summary
    assert all(v.margin for v in verdicts if v.verdict != C.SKIPPED)
    md = C.markdown(verdicts, "claims")
    assert "| 16-bit LoRA's VRAM use lies between full precision (fp32) and 8-bit quantisation | holds | **REFUTED** " \
           "| holds |" in md


def test_numerics_verdicts_name_the_weights():
    """A loss-curve verdict on a local checkpoint (the record's spec has model_path) is on
    real weights; on a preset it is on the synthetic checkpoint's random ones."""
    _, ctx = _fake_ctx()
    assert claimsrun.claim_more_stable(ctx, "on").weights == "random weights (synthetic checkpoint)"
    _, real = _fake_ctx()
    real.template = real.template.replace(model_path="/ckpt/llama-3.1-8b")
    v = claimsrun.claim_more_stable(real, "on")
    assert v.weights == "real weights (/ckpt/llama-3.1-8b)" and "| real weights (/ckpt/llama-3.1-8b) |" in \
        C.markdown([v], "claims")
    assert C.judge_vram_between({"fp32": [None], "bf16": [1.0], "int8": [1.0]}).verdict == C.ERROR


def test_claims_seeds_option():
    assert claimsrun.seeds_option(None) == 2 and claimsrun.seeds_option(3) == 3
    with pytest.raises(SpecError, match="--claims-seeds"):
        claimsrun.seeds_option(0)
    _, ctx = _fake_ctx(n_seeds=3)
    assert ctx.seeds == (0, 1, 2)
    assert ctx.comparison_cell("bf16", "on", 2).cell_id.endswith("/gc-on/load-pretrained/seed2")


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def cpu_claims(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("claims") / "run"
    args = ("suites/test_claims.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu",
            "--run-dir", str(run_dir))
    first = _pytest(*args)
    lines_after_first = (run_dir / "results.jsonl").read_text().splitlines()
    second = _pytest(*args)
    return first, second, run_dir, lines_after_first


def test_claims_suite_on_cpu(cpu_claims):
    first, _, run_dir, _ = cpu_claims
    table = json.loads((run_dir / "claims.json").read_text())
    assert len(table) == 6 * 3  # every claim in every checkpointing mode
    assert {(v["claim"], v["grad_ckpt"]) for v in table} == {(k, m) for k in C.CLAIMS for m in ("off", "on", "offload")}
    for v in table:  # every VRAM claim is skipped on a CPU host, with that reason
        if C.CLAIMS[v["claim"]].needs_gpu:
            assert v["verdict"] == C.SKIPPED and ("needs a GPU" in v["summary"] or "gc-off is the mode" in v["summary"])
        else:  # two seeds: a verdict, or inconclusive inside the noise, always with the margin
            assert v["verdict"] in (C.HOLDS, C.REFUTED, C.INCONCLUSIVE), v
            assert "noise" in v["margin"] and v["margin"].endswith(f"-> {v['verdict']}")
    stable = next(v for v in table if v["claim"] == "more-stable")
    assert set(stable["numbers"]["losses"]) == {"fp32", "bf16", "int8", "nf4"} and stable["numbers"]["seeds"] == 2
    assert stable["weights"] == "random weights (synthetic checkpoint)"
    assert all(len(seeds) == 2 and all(len(x) == 7 and all(math.isfinite(float(y)) for y in x) for x in seeds)
               for seeds in stable["numbers"]["losses"].values())
    # pytest's outcome follows the verdict: a refuted claim fails, showing its numbers;
    # an inconclusive one is skipped (never passed), with its margin and noise
    refuted = [v for v in table if v["verdict"] == C.REFUTED]
    inconclusive = [v for v in table if v["verdict"] == C.INCONCLUSIVE]
    assert first.returncode == (1 if refuted else 0), first.stdout[-3000:]
    for v in refuted:
        assert "REFUTED" in first.stdout and v["summary"].split(":")[0] in first.stdout
    assert f"{12 + len(inconclusive)} skipped" in first.stdout and "needs a GPU" in first.stdout
    assert ("INCONCLUSIVE" in first.stdout) == bool(inconclusive)
    md = (run_dir / "claims.md").read_text()
    assert "| claim (../shared/SEED.md) | checkpointing | verdict | margin (difference vs noise) | weights | the " \
           "numbers |" in md and "| claim (../shared/SEED.md) | gc-off | gc-on | gc-offload |" in md
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["precision"] for r in recs) == sorted(["bf16", "fp32", "int8", "nf4"] * 3 * 2)
    assert all(r["spec"]["load"] == "pretrained" and r["status"] == "ok" for r in recs)
    assert sum(r["cell_id"].endswith("/seed1") for r in recs) == 12 and {r["seq_len"] for r in recs} == {128}


def test_claims_suite_reuses_the_run_folder(cpu_claims):
    first, second, run_dir, lines_after_first = cpu_claims
    assert (run_dir / "results.jsonl").read_text().splitlines() == lines_after_first  # nothing ran again
    assert second.returncode == first.returncode
    assert "worker server ready" not in second.stdout  # not even the worker server started


def test_a_bad_claims_seeds_option_is_a_usage_error(tmp_path):
    proc = _pytest("suites/test_claims.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu",
                   "--claims-seeds", "0", "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 4 and "lora-harness: --claims-seeds must be >= 1, got 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "r" / "results.jsonl").exists()
