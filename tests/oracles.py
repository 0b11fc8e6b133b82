"""Independent references for the statistics tests: exact enumeration and the pre-scipy bootstrap."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def exact_mcnemar_oracle(b: int, c: int) -> float:
    """Two-sided exact binomial test by enumeration in exact fractions: the sum of P(X = k) over every
    k no more likely than the observed count, X ~ Binomial(b + c, 1/2) (the "minlike" definition)."""
    n = b + c
    pmf = [Fraction(math.comb(n, k), 2**n) for k in range(n + 1)]
    return float(sum(p for p in pmf if p <= pmf[b]))


def bootstrap_oracle(diffs: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float, float]:
    """The pre-scipy implementation, kept as the reference the library version must reproduce
    exactly: resample items in blocks of 1000 from one seeded generator, percentile CI, null-centred p."""
    rng = np.random.default_rng(seed)
    observed, n = float(diffs.mean()), len(diffs)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):
        size = min(1000, n_boot - start)
        means[start:start + size] = diffs[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    extreme = int(np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12))
    return observed, float(low), float(high), (extreme + 1) / (n_boot + 1)
