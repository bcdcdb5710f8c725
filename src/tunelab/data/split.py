"""Deterministic train / validation / test split keyed on a hash of each row.

Each row's split is a function of its own content and label, nothing else:

    u = sha256(label + "\\x00" + content) mapped to [0, 1)
    u < 0.8 -> train;  u < 0.9 -> validation;  else -> test

So the split is the same on every machine and run, appending rows never moves a
row already assigned, and exact duplicates always land in the same split (no
train/test leakage through repeats).

Stratified by label: every label's rows are split by the same thresholds, so each
label is represented in every split in proportion (up to binomial variation: a
label with 130 rows gets 13 +- 3.4 test rows). We deliberately do not rebalance by
rank within a label: that would move old rows whenever rows are added.

Example (illustrative letters), appending rows keeps old assignments:

    split(["a", "b", "c"])        -> train {a, c}, test {b}
    split(["a", "b", "c", "d"])   -> train {a, c, d}, test {b}    (a, b, c unchanged)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from tunelab.config import DEFAULT_SPLIT
from tunelab.data.records import Conversation

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    train: list[Conversation]
    validation: list[Conversation]
    test: list[Conversation]
    stratified: bool  # True when the data looked like classification (few distinct answers)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def row_key(conv: Conversation) -> str:
    """A stable content hash of one row (roles, contents, weights)."""
    h = hashlib.sha256()
    for m in conv.messages:
        h.update(f"{m.role}\x00{m.weight}\x00{m.content}\x01".encode())
    return h.hexdigest()


def unit_interval(key: str, salt: str = "") -> float:
    """Map a hex key to [0, 1) uniformly and deterministically."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_classification(convs: list[Conversation]) -> bool:
    """Classification-like: few distinct answers, each seen at least twice on average.

    Banking77: 77 distinct answers over 10,003 rows -> True. Free-text answers -> False.
    """
    if len(convs) < 4:
        return False
    counts = Counter(c.answer for c in convs)
    return 2 <= len(counts) <= max(2, len(convs) // 5)


def split_conversations(
    convs: list[Conversation], fractions: tuple[float, float, float] = DEFAULT_SPLIT
) -> Split:
    """Split rows by hash; stratified by answer label when the data is classification-like."""
    stratified = is_classification(convs)
    bounds = (fractions[0], fractions[0] + fractions[1])
    parts: dict[str, list[tuple[float, Conversation]]] = {name: [] for name in SPLIT_NAMES}
    for conv in convs:
        # No salt depending on `stratified`: that flag can flip as data grows, and must not move old rows.
        u = unit_interval(row_key(conv))
        name = "train" if u < bounds[0] else "validation" if u < bounds[1] else "test"
        parts[name].append((u, conv))
    # Order inside a split is by hash, not by file position: files are often sorted by label
    # (Banking77 is), so "the first N rows" of a split must be a shuffled, yet fixed, subset.
    ordered = {name: [c for _, c in sorted(rows, key=lambda t: t[0])] for name, rows in parts.items()}
    return Split(ordered["train"], ordered["validation"], ordered["test"], stratified)
