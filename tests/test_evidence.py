"""Verdicts against their noise: the arithmetic (harness.core.evidence) and the stability
table's verdict over seeds (harness.report.stability), with the H200 reference numbers
(Llama-3.2-1B shape, 100 steps, one seed: final loss over fp32's bf16 1.247, fp4 1.255,
int8 1.031 against the limit 1.25)."""

import math

import pytest

from harness.core import evidence as E
from harness.report import stability


# -- the arithmetic ----------------------------------------------------------------------

def test_a_difference_inside_the_repeat_spread_is_undecided():
    c = E.compare("bf16", [0.0223, 0.0203], "int8", [0.0214, 0.0234])
    assert not c.decided and c.noise == pytest.approx(0.0020 / 0.0224)  # on the difference's scale
    assert c.text(outcome="inconclusive") == ("bf16 0.0213 vs int8 0.0224: difference 4.9% <= noise 8.9% "
                                              "(repeat spread of 2 seeds) -> inconclusive")
    assert E.compare("bf16", [1.0, 1.01], "int8", [2.0, 2.02]).decided
    # a tiny side's large relative scatter does not hide a large absolute difference
    assert E.compare("bf16", [0.0001, 0.0002], "int8", [0.0100, 0.0101]).decided


def test_one_seed_measures_no_noise():
    c = E.compare("bf16", [0.0223], "int8", [0.0214])
    assert c.noise is None and not c.decided and "one seed: no repeat spread" in c.text()
    one = E.against_limit("final / fp32", [1.031], 1.25, upper=True)
    assert one.inside and not one.decided and "one seed" in one.text()


def test_extra_noise_counts_when_larger():
    c = E.compare("bf16", [4461, 4470], "nf4", [4038, 4040], extra_noise={"step-time spread of nf4": 0.18})
    assert not c.decided and c.noise == pytest.approx(0.18) and c.noise_from == "step-time spread of nf4"


def test_limits_with_a_spread():
    assert E.against_limit("r", [1.031, 1.040], 1.25, upper=True).decided
    straddles = E.against_limit("r", [1.240, 1.254], 1.25, upper=True)
    assert not straddles.decided and straddles.noise == pytest.approx(0.014)
    out = E.against_limit("r", [1.40, 1.45], 1.25, upper=True)
    assert out.decided and not out.inside
    assert E.against_limit("drop", [0.6, 0.62], 0.15, upper=False).decided


def test_seed_tags_and_weights():
    assert E.seeds(5, 3) == (5, 6, 7)
    assert E.seed_tag("stability", 5, 5) == "stability" and E.seed_tag("stability", 6, 5) == "stability/seed6"
    assert E.seed_tag("", 1, 0) == "seed1" and E.without_seed_tag("stability/seed6") == "stability"
    assert E.repeat_key({"seed": 0, "tag": "x"}) == E.repeat_key({"seed": 3, "tag": "x/seed3"})
    assert E.weights_label({"model_path": None}) == "random weights (synthetic checkpoint)"
    assert E.weights_label({"model_path": "/ckpt/llama"}) == "real weights (/ckpt/llama)"
    assert E.step_time_spread([0.47, 0.50, 0.52, 0.51, 0.56]) == pytest.approx(0.09 / 0.51)
    assert E.rel_spread([1.0]) is None


# -- the stability verdict over seeds ----------------------------------------------------

def _curve(n=100, start=6.9, end=4.9):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def _rec(precision, ratio=1.0, seed=0, model_path=None, losses=None):
    tag = "stability" if seed == 0 else f"stability/seed{seed}"
    base = [x * (1 + 0.001 * seed) for x in _curve()]
    return {"cell_id": f"m/{precision}/{tag}", "model": "m", "precision": precision, "status": "ok",
            "losses": losses if losses is not None else [x * ratio for x in base],
            "spec": {"model": "m", "precision": precision, "seed": seed, "tag": tag, "model_path": model_path}}


def _verdicts(recs):
    return {v["precision"]: v for v in stability.report(recs)["verdicts"]}


def test_the_h200_reference_ratios_with_one_seed_are_inconclusive():
    """bf16 at 1.247 and fp4 at 1.255 against 1.25: one seed measures no spread, so neither
    is a verdict (it was "stable" / "unstable" in the third decimal); int8 at 1.031 is not
    decided by one seed either."""
    recs = [_rec("fp32"), _rec("bf16", 1.247), _rec("fp4", 1.255), _rec("int8", 1.031)]
    rows = {r["precision"]: r for r in stability.report(recs)["rows"]}
    assert {p: rows[p]["verdict"] for p in rows} == {p: "inconclusive" for p in ("fp32", "bf16", "fp4", "int8")}
    v = _verdicts(recs)
    assert v["bf16"]["ratio"]["values"] == [pytest.approx(1.247)] and v["bf16"]["ratio"]["noise"] is None
    assert "final / fp32 1.247 (one seed), limit 1.250: 0.003 inside, noise not measured" in v["bf16"]["margin"]
    assert "final / fp32 1.255 (one seed), limit 1.250: 0.005 outside" in v["fp4"]["margin"]


def test_seeds_decide_what_their_spread_allows():
    recs = [_rec("fp32", seed=s) for s in (0, 1)]
    recs += [_rec("bf16", r, seed=s) for r, s in ((1.240, 0), (1.254, 1))]  # straddles the limit
    recs += [_rec("int8", r, seed=s) for r, s in ((1.031, 0), (1.036, 1))]  # clearly inside
    recs += [_rec("fp4", r, seed=s) for r, s in ((1.40, 0), (1.45, 1))]  # clearly outside
    v = _verdicts(recs)
    assert {p: x["verdict"] for p, x in v.items()} == {"fp32": "stable", "bf16": "inconclusive", "int8": "stable",
                                                      "fp4": "unstable"}
    assert v["bf16"]["margin"].startswith("final / fp32 1.247 (seeds 1.240-1.254), limit 1.250: 0.003 inside <= "
                                          "noise 0.014 (spread of 2 seeds); drop ")
    assert v["bf16"]["margin"].endswith(" -> inconclusive") and v["fp4"]["margin"].endswith(" -> unstable")
    assert v["int8"]["seeds"] == [0, 1] and v["int8"]["cell_ids"] == ["m/int8/stability", "m/int8/stability/seed1"]
    md = stability.report(recs)["markdown"]
    assert "| m | bf16 | random weights (synthetic checkpoint) | 2 | 1.247 (1.240-1.254) |" in md
    assert "margin (difference vs noise)" in md and "## Runs" in md


def test_a_non_finite_loss_fails_whatever_the_other_seeds_say():
    bad = _curve()
    bad[3] = math.nan
    recs = [_rec("fp32", seed=s) for s in (0, 1, 2)]
    recs += [_rec("fp16", 1.0, seed=0, losses=bad), _rec("fp16", 1.0, seed=1), _rec("fp16", 1.0, seed=2)]
    v = _verdicts(recs)["fp16"]
    assert v["verdict"] == "non-finite" and "m/fp16/stability: loss not finite at 1 of 100 steps" in v["margin"]


def test_the_weights_are_named():
    recs = [_rec("fp32", seed=s, model_path="/ckpt/llama") for s in (0, 1)]
    recs += [_rec("bf16", 1.01, seed=s, model_path="/ckpt/llama") for s in (0, 1)]
    assert _verdicts(recs)["bf16"]["weights"] == "real weights (/ckpt/llama)"
    assert _verdicts([_rec("fp32")])["fp32"]["weights"] == "random weights (synthetic checkpoint)"


def test_a_flat_loss_over_seeds_is_unstable():
    recs = [_rec("fp32", seed=s, losses=[6.9 + 0.001 * s] * 100) for s in (0, 1)]
    v = _verdicts(recs)["fp32"]
    assert v["verdict"] == "unstable"
    assert "drop 0.0% (seeds 0.0%-0.0%), limit 15.0%: 15.0% outside > noise 0.0%" in v["margin"]
