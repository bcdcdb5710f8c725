"""tunelab.evaluation.stats: bootstrap intervals, paired bootstrap, exact McNemar, on data with known answers."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import numpy as np
import pytest

from tunelab.evaluation import stats
from tunelab.evaluation.metrics import macro_f1, macro_f1_resampler, normalize_label
from tunelab.evaluation.stats import bootstrap_ci, bootstrap_ci_indices, mcnemar, paired_bootstrap


def test_docstring_examples():
    assert doctest.testmod(stats).failed == 0


def _exact_mcnemar(b: int, c: int) -> float:
    """The same test in exact rational arithmetic: 2 * sum_{i <= min(b, c)} C(n, i) / 2^n, capped at 1."""
    n = b + c
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


# ---------------------------------------------------------------- McNemar


def test_mcnemar_one_sided_discordance():
    # 10 rows only a got right, 0 only b, 7 both right, 3 both wrong.
    a = [True] * 10 + [True] * 7 + [False] * 3
    b = [False] * 10 + [True] * 7 + [False] * 3
    result = mcnemar(a, b)
    assert (result.b, result.c) == (10, 0)
    assert result.p_value == pytest.approx(2 * 0.5**10, rel=1e-12)
    # Swapping the contenders swaps b and c, not the p-value.
    swapped = mcnemar(b, a)
    assert (swapped.b, swapped.c) == (0, 10) and swapped.p_value == pytest.approx(result.p_value, rel=1e-12)


@pytest.mark.parametrize("k", [1, 5, 40, 1000])
def test_mcnemar_symmetric_is_one(k):
    a = [True] * k + [False] * k
    b = [False] * k + [True] * k
    assert mcnemar(a, b).p_value == 1.0


def test_mcnemar_small_hand_case():
    # b=3, c=1: n=4, P(X <= 1) = (1 + 4) / 16, two-sided 10/16.
    a = [True, True, True, False, True]
    b = [False, False, False, True, True]
    result = mcnemar(a, b)
    assert (result.b, result.c) == (3, 1)
    assert result.p_value == pytest.approx(0.625, rel=1e-12)


@pytest.mark.parametrize(("b", "c"), [(120, 80), (60, 40), (3000, 2000), (2600, 2500)])
def test_mcnemar_matches_exact_arithmetic_for_large_n(b, c):
    a_correct = [True] * b + [False] * c
    b_correct = [False] * b + [True] * c
    result = mcnemar(np.array(a_correct), np.array(b_correct))
    assert result.p_value == pytest.approx(_exact_mcnemar(b, c), rel=1e-9)
    assert 0 < result.p_value <= 1


def test_mcnemar_tiny_p_never_zero_and_no_discordance():
    # 2 * 0.5**20000 is far below the smallest float: reported as that float, not as 0.
    assert 0 < mcnemar([True] * 20000, [False] * 20000).p_value < 1e-300
    same = mcnemar([True, False, True], [True, False, True])
    assert (same.b, same.c, same.p_value) == (0, 0, 1.0)


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError, match="same test rows"):
        mcnemar([True, False], [True])


# ---------------------------------------------------------------- bootstrap intervals


def test_bootstrap_ci_of_a_constant_is_a_point():
    lo, hi = bootstrap_ci([0.7] * 200)
    assert lo == hi and lo == pytest.approx(0.7)


def test_bootstrap_ci_of_coin_flips():
    rng = np.random.default_rng(123)
    flips = rng.permutation([0.0] * 250 + [1.0] * 250)  # mean exactly 0.5
    lo, hi = bootstrap_ci(flips, n_resamples=4000)
    half_width = 1.959964 * math.sqrt(0.25 / 500)  # 0.0438, the normal approximation
    assert lo == pytest.approx(0.5 - half_width, abs=0.006)
    assert hi == pytest.approx(0.5 + half_width, abs=0.006)
    # A 90% interval is narrower, and the median statistic works too.
    lo90, hi90 = bootstrap_ci(flips, n_resamples=4000, confidence=0.90)
    assert lo < lo90 < 0.5 < hi90 < hi
    assert bootstrap_ci([1.0, 2.0, 3.0, 100.0] * 20, statistic=np.median)[1] <= 3.0


def test_bootstrap_is_deterministic_with_a_seed():
    values = np.random.default_rng(0).random(300)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_indices_equals_values_version_and_handles_macro_f1():
    values = np.random.default_rng(1).random(100)
    assert bootstrap_ci_indices(100, lambda idx: float(values[idx].mean()), seed=3) == bootstrap_ci(values, seed=3)

    refs = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    preds = ["a"] * 55 + ["b"] * 5 + ["b"] * 25 + ["a"] * 5 + ["c"] * 5 + ["a"] * 5
    labels = sorted({normalize_label(r) for r in refs})
    point = macro_f1(preds, refs, labels)
    lo, hi = bootstrap_ci_indices(
        len(refs), lambda idx: macro_f1([preds[i] for i in idx], [refs[i] for i in idx], labels), n_resamples=500
    )
    assert lo < point < hi and hi - lo > 0.05
    # The fast version (labels encoded once) gives the same interval.
    assert bootstrap_ci_indices(len(refs), macro_f1_resampler(preds, refs), n_resamples=500) == (lo, hi)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"values": []}, "non-empty"), ({"values": [1.0], "confidence": 1.0}, "confidence"),
     ({"values": [1.0], "n_resamples": 0}, "n_resamples")],
)
def test_bootstrap_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_identical_lists():
    scores = np.random.default_rng(2).random(200)
    result = paired_bootstrap(scores, scores.copy())
    assert result.delta == 0.0 and result.delta_ci == (0.0, 0.0)
    assert result.p_value == 1.0


def test_paired_bootstrap_clearly_better():
    a = [1.0] * 180 + [0.0] * 20  # 90% right
    b = [1.0] * 60 + [0.0] * 140  # 30% right, same rows
    result = paired_bootstrap(a, b, n_resamples=1000)
    assert result.delta == pytest.approx(0.6)
    assert result.delta_ci[0] > 0.5 and result.delta_ci[1] < 0.7
    assert result.p_value == 1 / 1001  # no resample as extreme under the null, and never 0
    # The sign follows the order of the arguments.
    assert paired_bootstrap(b, a, n_resamples=1000).delta == pytest.approx(-0.6)


def test_paired_bootstrap_borderline_matches_normal_theory():
    # Per-row differences: 60 rows +1, 40 rows -1, 300 rows 0. delta = 0.05,
    # standard error sqrt((100/400 - 0.05**2) / 400) = 0.0249, z = 2.01: two-sided p ~ 0.044.
    a = [1.0] * 60 + [0.0] * 40 + [1.0] * 150 + [0.0] * 150
    b = [0.0] * 60 + [1.0] * 40 + [1.0] * 150 + [0.0] * 150
    result = paired_bootstrap(a, b, n_resamples=4000, seed=5)
    assert result.delta == pytest.approx(0.05)
    assert 0.03 < result.p_value < 0.065  # a one-sided p would be half of this
    se = math.sqrt((100 / 400 - 0.05**2) / 400)
    assert result.delta_ci[0] == pytest.approx(0.05 - 1.96 * se, abs=0.012)
    assert result.delta_ci[1] == pytest.approx(0.05 + 1.96 * se, abs=0.012)
    assert paired_bootstrap(a, b, n_resamples=4000, seed=5) == result  # deterministic with the seed


def test_paired_bootstrap_length_mismatch():
    with pytest.raises(ValueError, match="same test rows"):
        paired_bootstrap([1.0, 0.0], [1.0])
