"""Bootstrap CIs and paired comparisons used in the base / SFT / SWiRL evaluation report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from swirl_core import stats
from swirl_core.stats import Estimate, PairedComparison, bootstrap_ci, mcnemar_exact, paired_comparison


def _exact_bernoulli(p: float, n: int) -> list[float]:
    """Exactly round(p*n) ones, so the sample proportion is p and only bootstrap noise varies."""
    k = round(p * n)
    return [1.0] * k + [0.0] * (n - k)


def _paired_binary(n: int, a_right: int, b_only_lost: int, b_only_gained: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Model A right on ``a_right`` questions; B loses ``b_only_lost`` of them and gains ``b_only_gained`` others."""
    a = np.zeros(n)
    a[:a_right] = 1.0
    b = a.copy()
    b[:b_only_lost] = 0.0
    b[a_right : a_right + b_only_gained] = 1.0
    perm = np.random.default_rng(seed).permutation(n)  # order must not matter, but don't rely on it
    return a[perm], b[perm]


# --- bootstrap_ci ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        _exact_bernoulli(0.7, 200),
        list(np.random.default_rng(1).normal(0.4, 0.2, size=300)),
        [0.0, 1.0, 0.5, 0.25, 1.0],
    ],
)
def test_ci_contains_mean(values: list[float]) -> None:
    est = bootstrap_ci(values, seed=3)
    assert isinstance(est, Estimate)
    assert est.n == len(values)
    assert est.mean == pytest.approx(float(np.mean(values)))
    assert est.low <= est.mean <= est.high
    assert est.low < est.high


def test_ci_shrinks_like_one_over_sqrt_n() -> None:
    small = bootstrap_ci(_exact_bernoulli(0.5, 100), seed=0)
    large = bootstrap_ci(_exact_bernoulli(0.5, 1600), seed=0)
    ratio = small.half_width / large.half_width
    assert ratio == pytest.approx(4.0, rel=0.15)  # sqrt(1600 / 100)


def test_known_case_bernoulli_07_n1500() -> None:
    est = bootstrap_ci(_exact_bernoulli(0.7, 1500), seed=0)
    assert est.mean == pytest.approx(0.7)
    expected = 1.96 * math.sqrt(0.7 * 0.3 / 1500)  # normal approximation, ~0.0232
    assert est.half_width == pytest.approx(0.023, abs=0.004)
    assert est.half_width == pytest.approx(expected, rel=0.15)


def test_confidence_level_widens_interval() -> None:
    values = _exact_bernoulli(0.6, 500)
    assert bootstrap_ci(values, confidence=0.99).half_width > bootstrap_ci(values, confidence=0.8).half_width


def test_empty_and_singleton() -> None:
    empty = bootstrap_ci([])
    assert empty.n == 0 and all(math.isnan(v) for v in (empty.mean, empty.low, empty.high))
    one = bootstrap_ci([0.3])
    assert (one.mean, one.low, one.high, one.n) == (0.3, 0.3, 0.3, 1)


def test_constant_values_give_zero_width() -> None:
    est = bootstrap_ci([1.0] * 50)
    assert est.low == est.high == est.mean == 1.0


def test_bootstrap_is_deterministic_given_seed() -> None:
    values = list(np.random.default_rng(7).random(400))
    assert bootstrap_ci(values, seed=11) == bootstrap_ci(values, seed=11)
    assert bootstrap_ci(values, seed=11) != bootstrap_ci(values, seed=12)


def test_chunk_size_does_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    values = list(np.random.default_rng(2).random(300))
    reference = bootstrap_ci(values, n_resamples=500, seed=5)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 300 * 7)  # 7 rows per chunk, ragged last chunk
    assert bootstrap_ci(values, n_resamples=500, seed=5) == reference


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"confidence": 0.0}, {"confidence": 1.0}])
def test_bad_parameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([0.0, 1.0], **kwargs)


def test_non_finite_values_raise() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([0.0, float("nan"), 1.0])


# --- mcnemar_exact --------------------------------------------------------------------------


def test_mcnemar_known_value_and_symmetry() -> None:
    # 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-4)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)


def test_mcnemar_edge_cases() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0  # clipped: the two tails overlap at the centre
    assert mcnemar_exact(0, 1) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(0, 1000) == pytest.approx(2.0**-999)  # 2**1000 would overflow a float
    assert mcnemar_exact(1000, 1000) == 1.0
    assert mcnemar_exact(0, 5000) == 0.0  # underflows gracefully instead of raising
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


# --- paired_comparison ----------------------------------------------------------------------


def test_paired_detects_real_gain_at_n1500() -> None:
    # A: 0.60; B loses 60 and gains 180 questions -> 0.68, a +0.08 gain as in the paper.
    a, b = _paired_binary(1500, a_right=900, b_only_lost=60, b_only_gained=180)
    cmp = paired_comparison(a, b, model_a="sft", model_b="swirl")
    assert isinstance(cmp, PairedComparison)
    assert (cmp.model_a, cmp.model_b, cmp.n) == ("sft", "swirl", 1500)
    assert cmp.mean_a == pytest.approx(0.60)
    assert cmp.mean_b == pytest.approx(0.68)
    assert cmp.diff == pytest.approx(0.08)
    assert 0.0 < cmp.low <= cmp.diff <= cmp.high
    assert cmp.p_bootstrap < 0.01
    assert (cmp.mcnemar_b, cmp.mcnemar_c) == (60, 180)
    assert cmp.p_mcnemar is not None and cmp.p_mcnemar < 0.01


def test_paired_small_gain_at_n30_is_not_significant() -> None:
    # Population accuracies 0.60 vs 0.62 (+0.02), 30 questions: the CI must straddle 0.
    rng = np.random.default_rng(0)
    a = (rng.random(30) < 0.60).astype(float)
    b = (rng.random(30) < 0.62).astype(float)
    cmp = paired_comparison(a, b, model_a="base", model_b="sft")
    assert cmp.low < 0.0 < cmp.high
    assert cmp.p_bootstrap > 0.05
    assert cmp.p_mcnemar is not None and cmp.p_mcnemar > 0.05


def test_identical_models() -> None:
    a = _exact_bernoulli(0.55, 200)
    cmp = paired_comparison(a, list(a), model_a="x", model_b="x")
    assert cmp.diff == 0.0 and cmp.low == 0.0 and cmp.high == 0.0
    assert cmp.p_bootstrap == 1.0
    assert (cmp.mcnemar_b, cmp.mcnemar_c, cmp.p_mcnemar) == (0, 0, 1.0)


def test_paired_is_tighter_than_unpaired_for_correlated_models() -> None:
    # Mostly-agreeing models: pairing cancels per-question difficulty.
    a, b = _paired_binary(1500, a_right=900, b_only_lost=20, b_only_gained=60)
    cmp = paired_comparison(a, b, model_a="a", model_b="b")
    unpaired = math.hypot(bootstrap_ci(a).half_width, bootstrap_ci(b).half_width)
    assert (cmp.high - cmp.low) / 2 < unpaired


def test_continuous_scores_skip_mcnemar() -> None:
    rng = np.random.default_rng(4)
    a = rng.random(500)
    b = np.clip(a + 0.05 + rng.normal(0, 0.1, 500), 0, 1)
    cmp = paired_comparison(a, b, model_a="a", model_b="b")
    assert cmp.mcnemar_b is None and cmp.mcnemar_c is None and cmp.p_mcnemar is None
    assert cmp.low > 0.0 and cmp.p_bootstrap < 0.01


def test_paired_sign_convention() -> None:
    a, b = _paired_binary(1500, a_right=900, b_only_lost=60, b_only_gained=180)
    forward = paired_comparison(a, b, model_a="a", model_b="b")
    backward = paired_comparison(b, a, model_a="b", model_b="a")
    assert backward.diff == pytest.approx(-forward.diff)
    assert backward.high < 0.0
    assert (backward.mcnemar_b, backward.mcnemar_c) == (forward.mcnemar_c, forward.mcnemar_b)
    assert backward.p_mcnemar == forward.p_mcnemar


def test_paired_is_deterministic_given_seed() -> None:
    rng = np.random.default_rng(9)
    a = (rng.random(300) < 0.5).astype(float)
    b = (rng.random(300) < 0.55).astype(float)
    first = paired_comparison(a, b, model_a="a", model_b="b", seed=1)
    assert paired_comparison(a, b, model_a="a", model_b="b", seed=1) == first
    assert paired_comparison(a, b, model_a="a", model_b="b", seed=2) != first


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1, 0, 1], [1, 0], model_a="a", model_b="b")


def test_paired_empty() -> None:
    cmp = paired_comparison([], [], model_a="a", model_b="b")
    assert cmp.n == 0 and math.isnan(cmp.diff) and math.isnan(cmp.p_bootstrap)
    assert cmp.p_mcnemar is None
