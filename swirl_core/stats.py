"""Bootstrap confidence intervals and paired model comparisons for evaluation reports.

The SWiRL paper's gains (+0.06-0.08) are only ~3x the CI half-width at n=1,500, so every
accuracy-like number we report carries a percentile-bootstrap 95% CI, and model-vs-model
claims use a *paired* test on the same questions (pairing removes question difficulty,
which dominates the variance of each model's own mean).

Everything is pure numpy + stdlib and deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "PairedComparison", "bootstrap_ci", "mcnemar_exact", "paired_comparison"]

# Upper bound on resample-matrix elements held at once (~32 MiB of float64 draws plus the
# gathered values), so n_resamples x n never has to fit in memory at once.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Estimate:
    """A sample mean with a percentile-bootstrap confidence interval."""

    mean: float
    low: float  # (1 - confidence) / 2 quantile of the bootstrap distribution: 2.5th percentile at 95%
    high: float  # (1 + confidence) / 2 quantile: 97.5th percentile at 95%
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class PairedComparison:
    """Model B vs model A on the same questions; positive ``diff`` means B is better."""

    model_a: str
    model_b: str
    n: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    low: float  # paired-bootstrap CI of the difference (questions resampled, same indices for both)
    high: float
    p_bootstrap: float  # two-sided: 2 * min(P(diff* <= 0), P(diff* >= 0)), clipped to [0, 1]
    mcnemar_b: int | None  # binary metrics only: questions A got right and B got wrong
    mcnemar_c: int | None  # A wrong, B right
    p_mcnemar: float | None  # exact two-sided McNemar (binomial) p-value on b vs c


def _as_vector(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        # A NaN would silently poison every resampled mean; make the caller decide how to score it.
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_params(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` with-replacement resamples of ``x`` (len(x) >= 1)."""
    n = x.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        # Indices from uniform doubles rather than rng.integers: each draw consumes exactly one
        # 64-bit output, so the stream (and the result) does not depend on the chunk size.
        idx = (rng.random((rows, n)) * n).astype(np.intp)
        np.minimum(idx, n - 1, out=idx)  # guard the u*n rounding up to n
        out[start : start + rows] = x[idx].mean(axis=1)
    return out


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile-bootstrap CI of the mean of ``values``.

    n=0 gives NaNs (nothing to estimate); n=1 gives low=high=mean (every resample is the same).
    """
    _check_params(n_resamples, confidence)
    x = _as_vector(values, "values")
    n = int(x.size)
    if n == 0:
        return Estimate(mean=math.nan, low=math.nan, high=math.nan, n=0)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean=mean, low=mean, high=mean, n=1)
    low, high = _interval(_bootstrap_means(x, n_resamples, seed), confidence)
    return Estimate(mean=mean, low=low, high=high, n=n)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(|X - (b+c)/2| >= |b - (b+c)/2|), X ~ Binomial(b+c, 1/2).

    Computed in exact integer arithmetic (math.comb), so it stays accurate for large b+c.
    """
    if isinstance(b, bool) or isinstance(c, bool) or int(b) != b or int(c) != c:
        raise ValueError(f"b and c must be integers, got {b!r}, {c!r}")
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"b and c must be non-negative, got {b}, {c}")
    total = b + c
    if total == 0:
        return 1.0  # no discordant pairs: no evidence either way
    tail = sum(math.comb(total, i) for i in range(min(b, c) + 1))
    # int / int is correctly rounded even when 2**total overflows a float.
    return min(1.0, 2 * tail / 2**total)


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0.0) | (x == 1.0)))


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    *,
    model_a: str,
    model_b: str,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare model B against model A where ``a[i]`` and ``b[i]`` score the same question.

    Resampling questions with the same indices for both models is the same as bootstrapping
    the per-question differences ``b - a``, which is what we do. McNemar fields are filled only
    when every score in both vectors is 0 or 1 (and n > 0).
    """
    _check_params(n_resamples, confidence)
    xa = _as_vector(a, "a")
    xb = _as_vector(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired scores must have equal length: len(a)={xa.size}, len(b)={xb.size}")
    n = int(xa.size)
    if n == 0:
        nan = math.nan
        return PairedComparison(model_a, model_b, 0, nan, nan, nan, nan, nan, nan, None, None, None)

    mean_a, mean_b = float(xa.mean()), float(xb.mean())
    d = xb - xa
    diff = mean_b - mean_a

    if n == 1:
        low = high = diff
        boot = np.full(n_resamples, float(d[0]))
    else:
        boot = _bootstrap_means(d, n_resamples, seed)
        low, high = _interval(boot, confidence)

    # Treat resampled means within float noise of 0 as exactly 0, so identical or exactly
    # balanced models are not pushed to one side by rounding in the mean.
    tol = 1e-12 * max(1.0, float(np.max(np.abs(d))))
    p_le = float(np.mean(boot <= tol))
    p_ge = float(np.mean(boot >= -tol))
    p_bootstrap = min(1.0, max(0.0, 2.0 * min(p_le, p_ge)))

    mc_b = mc_c = None
    p_mc = None
    if _is_binary(xa) and _is_binary(xb):
        mc_b = int(np.sum((xa == 1.0) & (xb == 0.0)))
        mc_c = int(np.sum((xa == 0.0) & (xb == 1.0)))
        p_mc = mcnemar_exact(mc_b, mc_c)

    return PairedComparison(
        model_a=model_a,
        model_b=model_b,
        n=n,
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        low=low,
        high=high,
        p_bootstrap=p_bootstrap,
        mcnemar_b=mc_b,
        mcnemar_c=mc_c,
        p_mcnemar=p_mc,
    )
