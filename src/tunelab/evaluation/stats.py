"""Uncertainty and significance for `tunelab eval`, on per-row scores (numpy only, no scipy).

- bootstrap_ci / bootstrap_ci_indices: percentile bootstrap intervals of one contender's metric;
- paired_bootstrap: the fine-tune minus a baseline on the same rows, with an interval and a p-value;
- mcnemar: exact test on the rows where exactly one of the two contenders is right.

Rows are the unit of resampling: the test rows are the sample, and a metric's
uncertainty is how much it would move on another test set drawn the same way.
Every function takes a seed, so an eval.json is reproducible.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedResult:
    """Difference of mean per-row scores, a minus b, on the same rows."""

    delta: float  # mean(a) - mean(b)
    delta_ci: tuple[float, float]  # percentile bootstrap interval of delta
    p_value: float  # two-sided, H0: no difference (see paired_bootstrap); never exactly 0


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired right/wrong outcomes."""

    b: int  # rows a got right and b got wrong (eval.json "wins" when a is the fine-tune)
    c: int  # rows a got wrong and b got right ("losses")
    p_value: float  # two-sided
    method: str  # how p_value was computed, for the report


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples is {n_resamples}; use at least 1 (2000 or more for a 95% interval).")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}; use a fraction in (0, 1), e.g. 0.95.")


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _resampled(n_rows: int, fn: Callable[[np.ndarray], float], n_resamples: int, seed: int) -> np.ndarray:
    """fn over n_resamples bootstrap samples of row indices (n_rows draws with replacement each)."""
    rng = np.random.default_rng(seed)
    # One resample at a time, not an (n_resamples, n_rows) matrix: 2000 x 100k rows would be 1.6 GB.
    return np.array([fn(rng.integers(0, n_rows, size=n_rows)) for _ in range(n_resamples)], dtype=float)


def bootstrap_ci_indices(
    n_rows: int,
    fn: Callable[[np.ndarray], float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of the rows, given as fn(row indices).

    For metrics that are not a mean of per-row values, such as macro-F1. Keep the
    label set fixed, so that a resample missing a rare label still averages over it:

        labels = sorted({normalize_label(r) for r in refs})
        bootstrap_ci_indices(len(refs), lambda idx: macro_f1(
            [preds[i] for i in idx], [refs[i] for i in idx], labels))

    fn receives an int array of shape (n_rows,), drawn with replacement.
    """
    if n_rows < 1:
        raise ValueError("bootstrap_ci_indices needs at least one row (n_rows is 0): evaluate on a non-empty test set.")
    _check(n_resamples, confidence)
    return _percentile_interval(_resampled(n_rows, fn, n_resamples, seed), confidence)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values), resampling rows with replacement.

    >>> bootstrap_ci([1.0] * 50)  # a constant has no spread: the interval is a point
    (1.0, 1.0)
    >>> lo, hi = bootstrap_ci([0.0, 1.0] * 250)  # 500 coin flips: about 0.5 +- 1.96 * sqrt(0.25 / 500)
    >>> round(lo, 2), round(hi, 2)
    (0.46, 0.54)
    """
    x = np.asarray(values, dtype=float)  # (n_rows,)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty list of per-row values, got shape {x.shape}.")
    return bootstrap_ci_indices(len(x), lambda idx: statistic(x[idx]), n_resamples, confidence, seed)


def paired_bootstrap(
    a_scores: Sequence[float] | np.ndarray,
    b_scores: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """Paired bootstrap of mean(a) - mean(b): both contenders' scores on the same resampled rows.

    Resampling rows jointly keeps each row's pairing, so row difficulty cancels out
    (Koehn 2004, "Statistical significance tests for machine translation evaluation").

    The p-value uses the shifted null (Efron & Tibshirani 1993, section 16.4): the
    bootstrap deltas d* spread around the observed delta d as estimates spread around
    the true difference; moved to centre on 0, that spread is the null H0 "no
    difference", and p = P(|d* - d| >= |d|). It assumes the spread does not depend on
    the true difference, and it is two-sided. (Koehn's "a wins in 95% of resamples"
    is a one-sided confidence, not this p-value.) p is (count + 1) / (n_resamples + 1),
    never 0: with 2000 resamples the smallest is about 5e-4; use mcnemar for smaller ones.

    >>> r = paired_bootstrap([1, 1, 0, 1], [1, 1, 0, 1])
    >>> r.delta, r.delta_ci, r.p_value
    (0.0, (0.0, 0.0), 1.0)
    """
    a = np.asarray(a_scores, dtype=float)
    b = np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two non-empty score lists of one length, got {a.shape} and "
                         f"{b.shape}: score both contenders on the same test rows.")
    _check(n_resamples, confidence)
    diff = a - b  # (n_rows,) per-row difference; resampling it resamples both lists jointly
    delta = float(diff.mean())
    boot = _resampled(len(diff), lambda idx: diff[idx].mean(), n_resamples, seed)  # (n_resamples,)
    extreme = int(np.sum(np.abs(boot - delta) >= abs(delta)))
    return PairedResult(delta, _percentile_interval(boot, confidence), (extreme + 1) / (n_resamples + 1))


def _log_binom_cdf_half(k: int, n: int) -> float:
    """log P(X <= k) for X ~ Binomial(n, 1/2), by log-sum-exp of log-pmfs (no overflow for large n)."""
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_pmf)
    return top + math.log(sum(math.exp(t - top) for t in log_pmf))


def mcnemar(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray) -> McNemarResult:
    """Exact McNemar test: do a and b differ in how often they are right on the same rows?

    Only discordant rows carry information: b rows where a is right and b wrong, c rows
    the reverse. Under H0 each discordant row goes either way with probability 1/2, so
    p = min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2) (two-sided, exact;
    doubling is exact here because that binomial is symmetric). No discordant rows: p = 1.
    A p-value below the smallest float (~2.2e-308) is reported as that float, not as 0.

    >>> mcnemar([True] * 10 + [False] * 5, [False] * 10 + [False] * 5)
    McNemarResult(b=10, c=0, p_value=0.001953125, method='exact binomial, two-sided')
    """
    a = np.asarray(a_correct, dtype=bool)
    b_arr = np.asarray(b_correct, dtype=bool)
    if a.shape != b_arr.shape or a.ndim != 1:
        raise ValueError(f"mcnemar needs two right/wrong lists of one length, got {a.shape} and {b_arr.shape}: "
                         "score both contenders on the same test rows.")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    if b + c == 0:
        return McNemarResult(b, c, 1.0, "no discordant rows: p = 1")
    log_p = math.log(2) + _log_binom_cdf_half(min(b, c), b + c)
    p = 1.0 if log_p >= 0 else math.exp(log_p)  # log_p >= 0 when the smaller tail holds half the mass or more
    return McNemarResult(b, c, max(p, sys.float_info.min), "exact binomial, two-sided")
