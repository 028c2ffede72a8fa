"""Verdicts against their noise: the arithmetic (harness.core.evidence)."""

import pytest

from harness.core import evidence as E


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
