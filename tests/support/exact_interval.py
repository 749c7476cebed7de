"""The exact (Clopper-Pearson) binomial interval from scipy: the reference the page's JavaScript and
finetune/binomial.py are held to. Beta quantiles, as Clopper and Pearson's interval is usually written:
[B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)], with 0 and 1 at the ends where k is 0 or n."""

from __future__ import annotations


def scipy_intervals(cases: list[tuple[int, int]], confidence: float = 0.95) -> list[tuple[float, float]]:
    """[(low, high)] for each (k, n), from scipy.stats.beta (vectorised: a grid of hundreds is quick)."""
    import numpy as np
    from scipy.stats import beta

    k = np.array([c[0] for c in cases], dtype=float)
    n = np.array([c[1] for c in cases], dtype=float)
    alpha = 1 - confidence
    with np.errstate(all="ignore"):  # the ends (k = 0, k = n) are set below, not computed
        low = np.where(k == 0, 0.0, beta.ppf(alpha / 2, k, n - k + 1))
        high = np.where(k == n, 1.0, beta.ppf(1 - alpha / 2, k + 1, n - k))
    return [(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]
