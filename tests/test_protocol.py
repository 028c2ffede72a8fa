"""benchmarks/protocol.py: paired ratios, the Student-t interval, verdicts, rounds to
decide, and the order of the sides. The expected figures were worked out by hand (the
arithmetic is in the comments); t quantiles are the textbook table's."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import protocol as P  # noqa: E402


def _times(logs):
    """Rounds whose ratio tA / tB is exp(x) for each x: tA = exp(x), tB = 1."""
    return [math.exp(x) for x in logs], [1.0] * len(logs)


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (5, 2.5706), (10, 2.2281),
                                   (13, 2.1604), (30, 2.0423), (120, 1.9799)])
def test_t_quantile_matches_the_table(df, t):
    assert P.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert P.t_quantile(0.025, df) == pytest.approx(-t, abs=1e-4)


def test_paired_ratios_are_b_throughput_over_a():
    # A took 2 s, B 1 s: B runs at twice A's tokens/s
    assert P.paired_ratios([2.0, 1.0], [1.0, 2.0]) == [2.0, 0.5]
    with pytest.raises(ValueError, match="differ in number"):
        P.paired_ratios([1.0], [1.0, 2.0])


def test_met():
    # x = 0.01, 0.03, 0.02, 0.00, 0.04: mean 0.02; squared deviations 1,1,0,4,4 (e-4) -> s^2 = 10e-4 / 4,
    # s = 0.0158114; se = s / sqrt(5) = 0.00707107; h = 2.776445 * se = 0.0196324
    c = P.compare(*_times([0.01, 0.03, 0.02, 0.00, 0.04]), "ratio >= 0.97")
    assert c.n == 5 and c.mean_log == pytest.approx(0.02)
    assert c.sd_log == pytest.approx(0.0158114, abs=1e-7)
    assert c.half_width_log == pytest.approx(0.0196324, abs=1e-7)
    assert c.ci[0] == pytest.approx(math.exp(0.0003676), abs=1e-7) and c.ci[1] == pytest.approx(math.exp(0.0396324),
                                                                                                abs=1e-7)
    assert c.geomean_ratio == pytest.approx(math.exp(0.02))
    assert c.half_width == pytest.approx(math.expm1(0.0196324), abs=1e-7)
    assert c.verdict == "met"
    # the lower end 1.00037 also clears a 1% cost (ratio > 0.99)
    assert P.compare(*_times([0.01, 0.03, 0.02, 0.00, 0.04]), "cost < 1%").verdict == "met"


def test_missed():
    # x = -0.05, -0.06, -0.04, -0.05, -0.05: mean -0.05, s^2 = 2e-4 / 4, s = 0.00707107, se = 0.00316228,
    # h = 0.00877989: ratios [exp(-0.0587799), exp(-0.0412201)] = [0.94291, 0.95962], all below 0.97
    c = P.compare(*_times([-0.05, -0.06, -0.04, -0.05, -0.05]), "ratio >= 0.97")
    assert c.ci == pytest.approx((0.942914, 0.959618), abs=1e-6)
    assert c.verdict == "missed"


def test_cannot_tell_and_rounds_to_decide():
    # x = 0, -0.06, 0.03, -0.03, 0.01: mean -0.01, squared deviations 1,25,16,4,4 (e-4) -> s^2 = 50e-4 / 4,
    # s = 0.0353553, se = 0.0158114, h = 0.0438992: [exp(-0.0538992), exp(0.0338992)] = [0.94753, 1.03448]
    # holds 0.97 -> cannot tell.
    c = P.compare(*_times([0.0, -0.06, 0.03, -0.03, 0.01]), "ratio >= 0.97")
    assert c.ci == pytest.approx((0.947527, 1.034481), abs=1e-6)
    assert c.verdict == "cannot tell"
    # distance to the boundary: -0.01 - ln 0.97 = 0.0204592; need t(n-1) s / sqrt(n) < d, i.e.
    # sqrt(n) / t(n-1) > s / d = 1.72809: n = 13: 3.60555 / 2.17881 = 1.6548 (no); n = 14: 3.74166 / 2.16037 = 1.7320
    assert c.rounds_to_decide == 14


def test_targets():
    t = P.parse_target("ratio >= 0.97")
    assert (t.lo, t.hi, t.lo_inclusive) == (0.97, None, True)
    assert P.parse_target("cost < 1%").lo == pytest.approx(0.99) and not P.parse_target("cost < 1%").lo_inclusive
    w = P.parse_target("within 1%")
    assert (w.lo, w.hi) == (pytest.approx(0.99), pytest.approx(1.01))
    assert P.verdict(0.995, 1.005, w) == "met"
    assert P.verdict(1.02, 1.03, w) == "missed" and P.verdict(0.95, 0.98, w) == "missed"
    assert P.verdict(0.98, 1.0, w) == "cannot tell"
    assert P.verdict(0.97, 1.0, t) == "met"  # >= includes its boundary
    assert P.verdict(0.99, 1.0, P.parse_target("cost < 1%")) == "cannot tell"  # > does not
    assert P.point_verdict(1.004, w) == "met" and P.point_verdict(None, w) is None
    with pytest.raises(ValueError, match="write"):
        P.parse_target("faster")


def test_too_few_rounds_cannot_tell():
    one = P.compare([1.0], [1.0], "ratio >= 0.97")
    assert one.verdict == "cannot tell" and one.ci is None and one.geomean_ratio == 1.0
    none = P.compare([], [], "cost < 1%")
    assert none.n == 0 and none.verdict == "cannot tell"
    # no spread at all: the interval is a point, and two rounds decide
    flat = P.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "ratio >= 0.97")
    assert flat.verdict == "met" and flat.rounds_to_decide == 2 and flat.half_width == 0.0


def test_schedule_alternates_who_goes_first():
    assert P.schedule(4) == [("A", "B"), ("B", "A"), ("B", "A"), ("A", "B")]
    assert P.schedule(4, scheme="alternate") == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]
    three = P.schedule(6, ("a", "b", "c"))
    assert three == [("a", "b", "c"), ("c", "b", "a"), ("b", "c", "a"), ("a", "c", "b"), ("c", "a", "b"),
                     ("b", "a", "c")]
    for pos in range(3):  # every side in every position equally often
        assert sorted(order[pos] for order in three) == ["a", "a", "b", "b", "c", "c"]


def test_table_cells():
    c = P.compare(*_times([0.01, 0.03, 0.02, 0.00, 0.04]), "ratio >= 0.97")
    ratio, ci, noise, verdict, need = P.fmt_comparison(c)
    assert ratio == "1.0202" and ci == "[1.0004, 1.0404]" and noise == "+-1.98%" and verdict == "met" and need == "3"
    assert P.fmt_comparison(c.to_dict())[0] == "1.0202" and P.fmt_comparison(None) == ("n/a",) * 5
