"""finetune/binomial.py, the Python twin of the blind test's verdict: held to scipy and to closed forms.

The page's JavaScript is held to the same references in test_report_html.py."""

from __future__ import annotations

import pytest

from finetune.binomial import COULD_NOT_TELL, COULD_TELL, NOT_ENOUGH, clopper_pearson, judged, verdict
from tests.support.exact_interval import scipy_intervals

GRID = [(k, n) for n in range(1, 41) for k in range(n + 1)]


def test_intervals_match_scipy_on_every_vote_count_of_a_40_pair_test():
    for (k, n), (low, high) in zip(GRID, scipy_intervals(GRID), strict=True):
        ours = clopper_pearson(k, n)
        assert ours == pytest.approx((low, high), abs=1e-9), (k, n)


@pytest.mark.parametrize("n", [1, 2, 5, 12, 40, 200])
def test_the_ends_have_closed_forms(n):
    # k = 0: P(X = 0) = (1-p)^n = 2.5% at the upper end; k = n: p^n = 2.5% at the lower end.
    assert clopper_pearson(0, n) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), abs=1e-12)
    assert clopper_pearson(n, n) == pytest.approx((0.025 ** (1 / n), 1.0), abs=1e-12)


def test_known_values():
    # as scipy.stats.binomtest(k, n).proportion_ci(method="exact") prints them (scipy 1.17)
    assert clopper_pearson(3, 10) == pytest.approx((0.06673951117773447, 0.652452850060008), abs=1e-9)
    assert clopper_pearson(20, 40) == pytest.approx((0.3380178137372346, 0.6619821862627654), abs=1e-9)
    assert clopper_pearson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k, n, expected", [
    (0, 0, NOT_ENOUGH),
    (5, 5, NOT_ENOUGH),  # 47.8-100%: five right could still be luck
    (6, 6, COULD_TELL),  # 54.1-100%: the fewest votes that can say so
    (27, 40, COULD_TELL),  # 50.9-81.4%
    (26, 40, NOT_ENOUGH),  # 48.3-78.7%
    (24, 40, NOT_ENOUGH),  # 43.3-75.1%: reaches 75%
    (23, 40, COULD_NOT_TELL),  # 40.9-73.0%
    (20, 40, COULD_NOT_TELL),
    (9, 18, COULD_NOT_TELL),  # 26.0-74.0%
    (10, 18, NOT_ENOUGH),  # 30.8-78.5%
    (0, 2, NOT_ENOUGH),  # 0-84.2%
    (0, 3, COULD_NOT_TELL),  # 0-70.8%: wrong three times is no sign of telling them apart
    (2, 40, COULD_NOT_TELL),  # the clone taken for the real person: not "could tell"
])
def test_verdict_reads_the_interval(k, n, expected):
    assert verdict(k, n) == expected


def test_verdict_on_the_whole_grid_follows_its_rule():
    for (k, n), (low, high) in zip(GRID, scipy_intervals(GRID), strict=True):
        rule = COULD_TELL if low > 0.5 else COULD_NOT_TELL if high < 0.75 else NOT_ENOUGH
        assert verdict(k, n) == rule, (k, n, low, high)


def test_judged_and_bad_counts():
    assert judged(9, 12) == {"right": 9, "total": 12, "rate": 0.75, "low": pytest.approx(0.4281, abs=1e-4),
                             "high": pytest.approx(0.9451, abs=1e-4), "verdict": NOT_ENOUGH}
    assert judged(0, 0)["rate"] is None
    for k, n in [(3, 2), (-1, 2), (1.0, 2)]:
        with pytest.raises(ValueError):
            clopper_pearson(k, n)
