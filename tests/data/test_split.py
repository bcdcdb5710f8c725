"""tunelab.data.split: deterministic, stratified, stable under appends."""

from __future__ import annotations

import random
from collections import Counter

from tunelab.data.records import Conversation, Message
from tunelab.data.split import is_classification, split_conversations


def row(text: str, answer: str, i: int = 0) -> Conversation:
    return Conversation((Message("user", text), Message("assistant", answer)), f"data.csv:{i}")


def labelled(labels: int, per_label: int, start: int = 0) -> list[Conversation]:
    return [row(f"request number {k} about topic {lab}", f"label_{lab}") for lab in range(labels)
            for k in range(start, start + per_label)]


def assignment(split) -> dict[tuple, str]:
    return {c.messages: name for name in ("train", "validation", "test") for c in getattr(split, name)}


def test_deterministic_and_independent_of_input_order():
    rows = labelled(4, 30)
    a = split_conversations(rows)
    b = split_conversations(rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    c = split_conversations(shuffled)
    for name in ("train", "validation", "test"):
        assert getattr(a, name) == getattr(b, name) == getattr(c, name)
    assert sum(a.sizes().values()) == len(rows)
    assert len({x.messages for x in a.train + a.validation + a.test}) == len(rows)


def test_stratified_every_label_in_every_split():
    rows = labelled(6, 80)
    split = split_conversations(rows, (0.8, 0.1, 0.1))
    assert split.stratified
    total = Counter(c.answer for c in rows)
    for name in ("train", "validation", "test"):
        counts = Counter(c.answer for c in getattr(split, name))
        assert set(counts) == set(total), f"{name} misses labels"
    train = Counter(c.answer for c in split.train)
    for label, n in total.items():
        assert 0.6 <= train[label] / n <= 0.95, (label, train[label], n)


def test_fractions_are_respected_roughly():
    rows = labelled(2, 500)
    split = split_conversations(rows, (0.5, 0.25, 0.25))
    sizes = split.sizes()
    assert abs(sizes["train"] / len(rows) - 0.5) < 0.06
    assert abs(sizes["validation"] / len(rows) - 0.25) < 0.06


def test_appending_rows_keeps_every_old_assignment():
    old = labelled(5, 60)
    new = labelled(6, 40, start=60)  # more rows of the old labels, and a new label
    before = assignment(split_conversations(old))
    after = assignment(split_conversations(old + new))
    assert all(after[key] == name for key, name in before.items())


def test_appending_rows_keeps_assignments_when_classification_flag_flips():
    old = labelled(3, 3)  # 9 rows, 3 labels: more labels than 9 // 5 -> not classification
    new = labelled(3, 2, start=3)  # 15 rows, 3 labels -> classification
    assert not split_conversations(old).stratified
    assert split_conversations(old + new).stratified
    before = assignment(split_conversations(old))
    after = assignment(split_conversations(old + new))
    moved = [key for key, name in before.items() if after[key] != name]
    assert moved == []


def test_duplicates_land_in_the_same_split():
    rows = labelled(3, 20)
    split = split_conversations(rows + rows)
    seen = {}
    for name in ("train", "validation", "test"):
        for c in getattr(split, name):
            assert seen.setdefault(c.messages, name) == name


def test_is_classification():
    assert is_classification(labelled(5, 20))
    free_text = [row(f"question {i}", f"a long free-text answer number {i}") for i in range(50)]
    assert not is_classification(free_text)
    assert not split_conversations(free_text).stratified
    assert not is_classification(labelled(2, 1))  # fewer than 4 rows
