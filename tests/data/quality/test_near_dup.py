"""tunelab.data.quality.near_dup: MinHash-LSH finds what brute-force Jaccard finds, deterministically, on sets small and odd."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np

from tunelab.data.quality import near_dup
from tunelab.data.quality.near_dup import Match, bands_for, earlier_matches, normalize, shingles, signatures

BASE = ("I ordered a replacement card two weeks ago and it still has not arrived at my home "
        "address, please check")  # 20 words


def jaccard(a: str, b: str) -> float:
    """Brute force, on Python sets of words and word pairs: the definition near_dup.py promises."""
    def grams(t: str) -> set:
        words = re.findall(r"[^\W_]+", normalize(t)) or [normalize(t)]
        return set(words) | set(zip(words, words[1:]))
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_normalize_folds_case_and_whitespace():
    assert normalize("  Where IS\nmy\t\tcard ") == "where is my card"
    assert normalize("STRASSE") == normalize("straße")  # casefold, not lower


def test_one_word_changed_in_a_twenty_word_row_is_a_near_duplicate():
    edited = BASE.replace("replacement", "new")
    assert len(BASE.split()) == 20
    texts = ["Completely unrelated: how do I top up with Apple Pay?", BASE, "Where is my card?", edited]
    matches = earlier_matches(texts)
    assert set(matches) == {3}
    assert matches[3].earlier == 1
    assert matches[3].similarity == jaccard(BASE, edited) == 36 / 42  # exact: 19 of 21 words, 17 of 21 pairs


def test_matches_equal_brute_force_on_a_random_set():
    # 300 rows: 60 "sources", each with edited variants; every pair checked by brute force as well.
    rng = random.Random(0)
    words = "card top up refund transfer account pin app cash fee rate euro pound arrive send help".split()
    sources = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) for _ in range(60)]
    texts = []
    for _ in range(300):
        w = rng.choice(sources).split()
        w[rng.randrange(len(w))] = rng.choice(words)
        texts.append(" ".join(w))
    truth: dict[int, int] = {}
    for j in range(len(texts)):
        for i in range(j):
            if jaccard(texts[i], texts[j]) >= 0.8:
                truth[j] = i
                break
    found = earlier_matches(texts)
    assert len(truth) > 50  # the set is worth testing on
    assert {j: m.earlier for j, m in found.items()} == truth  # same rows, same first partner


def test_deterministic_and_estimates_track_jaccard():
    texts = [BASE, BASE.replace("home", "house"), BASE.replace("two weeks", "ten days"), "Where is my card?"]
    hashes, offsets = shingles([normalize(t) for t in texts])
    sig = signatures(hashes, offsets)
    assert sig.shape == (4, near_dup.NUM_HASHES) and sig.dtype == np.uint32
    assert np.array_equal(sig, signatures(*shingles([normalize(t) for t in texts])))
    for i, j in itertools.combinations(range(4), 2):
        estimate = float((sig[i] == sig[j]).mean())
        assert abs(estimate - jaccard(texts[i], texts[j])) < 0.15, (i, j)  # 4 standard deviations at K = 120


def test_reference_mode_matches_queries_against_reference_only():
    train = [BASE, "How do I top up with Apple Pay?"]
    test = [BASE.replace("home", "house"), "Something else entirely, about exchange rates", BASE.replace("home", "flat")]
    matches = earlier_matches(train + test, reference=len(train))
    # Query 4 (index 2 + 2) is also near query 2, but only training rows count.
    assert {j: m.earlier for j, m in matches.items()} == {2: 0, 4: 0}


def test_short_empty_and_identical_texts():
    assert earlier_matches([]) == {}
    assert earlier_matches(["ok", "ok", "no", "", ""]) == {1: Match(0, 1.0), 4: Match(3, 1.0)}
    # A bucket of 500 identical rows: each is matched to the first, and the pair count stays bounded.
    same = ["the same row about a card that has not arrived"] * 500
    assert all(m.earlier == 0 for m in earlier_matches(same).values())
    sig = signatures(*shingles(same))
    assert len(near_dup.candidate_pairs(sig)) <= 500 * near_dup.BUCKET_CAP


def test_banding_catches_pairs_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = bands_for(threshold)
        assert bands * rows == near_dup.NUM_HASHES
        recall_at_threshold = 1 - (1 - threshold**rows) ** bands  # P(a pair at the threshold shares a band)
        assert recall_at_threshold >= near_dup.RECALL
    assert bands_for(0.8) == (20, 6)
