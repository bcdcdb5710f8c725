"""tunelab.evaluate.metrics: Wilson interval, label normalisation, accuracy."""

from __future__ import annotations

import math

import pytest

from tunelab.evaluate.metrics import Z_95, accuracy, normalize_label, wilson_interval


def test_wilson_zero_successes():
    low, high = wilson_interval(0, 300)
    assert low == pytest.approx(0.0, abs=1e-12)  # centre - half cancels to ~1e-18, not exactly 0
    # By hand: p = 0 -> high = (z^2/n) / (1 + z^2/n)
    z2n = Z_95**2 / 300
    assert high == pytest.approx(z2n / (1 + z2n), abs=1e-12)
    assert round(high, 5) == 0.01264


def test_wilson_known_case():
    assert [round(x, 4) for x in wilson_interval(81, 100)] == [0.7222, 0.8749]


def test_wilson_all_successes_and_symmetry():
    low, high = wilson_interval(50, 50)
    assert high == 1.0 and 0.9 < low < 1.0
    a = wilson_interval(30, 100)
    b = wilson_interval(70, 100)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])


def test_wilson_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_contains_p_and_narrows_with_n():
    for k, n in [(1, 3), (5, 10), (37, 40), (400, 1000)]:
        low, high = wilson_interval(k, n)
        assert low <= k / n <= high
    assert math.isclose(Z_95, 1.959963984540054)
    width = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (10, 100, 1000)]
    assert width[0] > width[1] > width[2]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (' "Card arrival." ', "card_arrival"),
        ("card_arrival", "card_arrival"),
        ("CARD-ARRIVAL", "card_arrival"),
        ("`card_arrival`:", "card_arrival"),
        ("card_arrival\nbecause the card is late", "card_arrival"),
        ("**top up**", "top_up"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_accuracy():
    result = accuracy(["Card arrival", "refund", "top_up", "nonsense"], ["card_arrival", "refund", "top-up", "lost_phone"])
    assert result["correct"] == 3 and result["n"] == 4
    assert result["accuracy"] == 0.75
    assert result["accuracy_ci"] == list(wilson_interval(3, 4))
    empty = accuracy([], [])
    assert empty["accuracy"] == 0.0 and empty["accuracy_ci"] == [0.0, 1.0]
