"""What the blind test's votes say: a 95% interval for the rate of picking the real reply, and a verdict.

With n votes and k right, k/n alone misleads: 4 of 5 is 80% and still fits a voter who is guessing.
The page (report_html.py, in JavaScript) and this module (its Python twin, which the tests check the
page against) give the exact Clopper-Pearson interval: the rates p for which k is not in either 2.5%
tail of Binomial(n, p). It never claims more confidence than it has, however few the votes, which
matters for a test of 40 pairs or fewer. The verdict reads it against a coin's 50%:

- the whole interval above 50%: the voters could tell which reply was real;
- the interval holds 50% and stays below 75%: they could not tell, no better than a coin. 75% is
  halfway from guessing to always right: a voter right 3 times in 4 can clearly tell, so an interval
  that still reaches it leaves the question open;
- otherwise (few votes, or a rate between): not enough votes yet to say.

Six right of six is the fewest votes that can say "could tell" (the interval starts at 54%), and 9 of
18 or 20 of 40 right say "could not tell" (their intervals end at 74% and 66%).
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95
CHANCE = 0.5
CAN_TELL = 0.75  # a rate of picking the real reply that means "can tell"; the docstring says why

COULD_TELL, COULD_NOT_TELL, NOT_ENOUGH = "could_tell", "could_not_tell", "not_enough"


def _log_choose(n: int) -> list[float]:
    """log C(n, j) for j = 0..n."""
    return [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(n + 1)]


def _tail(terms: list[tuple[int, float]], n: int, p: float) -> float:
    """The sum of Binomial(n, p)'s probabilities at the given (j, log C(n, j)), for 0 < p < 1."""
    log_p, log_q = math.log(p), math.log1p(-p)
    return sum(math.exp(log_c + j * log_p + (n - j) * log_q) for j, log_c in terms)


def _solve(k: int, n: int, upper: bool, target: float) -> float:
    """The p where P(X >= k) (`upper`) or P(X <= k) equals `target`, by bisection: the first grows
    with p, the second shrinks."""
    log_c = _log_choose(n)
    terms = [(j, log_c[j]) for j in (range(k, n + 1) if upper else range(k + 1))]
    lo, hi = 0.0, 1.0
    for _ in range(100):  # 2**-100: below a float's resolution
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if (_tail(terms, n, mid) < target) == upper:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided interval for the rate behind k successes in n trials."""
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n, got k={k!r}, n={n!r}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    low = 0.0 if k == 0 else _solve(k, n, True, alpha / 2)
    high = 1.0 if k == n else _solve(k, n, False, alpha / 2)
    return low, high


def verdict(k: int, n: int) -> str:
    """COULD_TELL, COULD_NOT_TELL or NOT_ENOUGH for k real replies picked in n votes (module docstring)."""
    low, high = clopper_pearson(k, n)
    if n and low > CHANCE:
        return COULD_TELL
    if n and high < CAN_TELL:
        return COULD_NOT_TELL
    return NOT_ENOUGH


def judged(k: int, n: int) -> dict:
    """The figures the page shows (and saves) for k right of n: rate, interval and verdict."""
    low, high = clopper_pearson(k, n)
    return {"right": k, "total": n, "rate": k / n if n else None, "low": low, "high": high, "verdict": verdict(k, n)}
