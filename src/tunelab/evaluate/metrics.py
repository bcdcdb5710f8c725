"""Task metrics with honest uncertainty.

Accuracy comes with a 95% Wilson score interval: unlike the normal approximation
p +- 1.96 sqrt(p(1-p)/n), it stays inside [0, 1] and is sensible at 0% or 100%
(the base model's 0/300 gets [0.0, 1.3%], not [0, 0]).
"""

from __future__ import annotations

import math
import re

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion.

    >>> [round(x, 4) for x in wilson_interval(81, 100)]
    [0.7222, 0.8749]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1 (floating point leaves ~1e-19 otherwise).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


_EDGE_PUNCT = re.compile(r"^[\s\"'`.*:]+|[\s\"'`.*:]+$")


def normalize_label(text: str) -> str:
    """Lenient label match, applied alike to every contender: case, edge punctuation, spaces vs underscores.

    >>> normalize_label(' "Card arrival." ')
    'card_arrival'
    """
    text = _EDGE_PUNCT.sub("", text.strip().splitlines()[0] if text.strip() else "")
    return re.sub(r"[\s\-]+", "_", text.lower())


def accuracy(predictions: list[str], references: list[str]) -> dict[str, float | int | list[float]]:
    """Accuracy of normalized exact match, with its 95% Wilson interval."""
    assert len(predictions) == len(references)
    correct = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    n = len(references)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "accuracy_ci": [low, high], "correct": correct, "n": n}
