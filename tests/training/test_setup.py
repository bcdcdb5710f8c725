"""tunelab.training.setup: the micro-batch stream of a run."""

from __future__ import annotations

import math

import pytest

from tunelab.data.tokenize import TokenizedExample
from tunelab.training.setup import epoch_stream


@pytest.mark.parametrize(("n", "batch_size", "epochs", "expected"), [
    (59, 8, 6, 48), (59, 8, 1, 8), (32, 8, 0.5, 2), (10, 4, 2.5, 8), (3, 8, 0.01, 1),
])
def test_epoch_stream_length(n, batch_size, epochs, expected):
    exs = [TokenizedExample([1] * (i % 7 + 2), [-100] * (i % 7 + 2), str(i)) for i in range(n)]
    stream = epoch_stream(exs, batch_size, epochs, seed=0)
    assert len(stream) == expected
    assert all(1 <= len(b) <= batch_size for b in stream)
    if epochs >= 1:  # each full epoch sees every example exactly once
        per_epoch = math.ceil(n / batch_size)
        first_epoch = [e.source for b in stream[:per_epoch] for e in b]
        assert sorted(first_epoch) == sorted(e.source for e in exs)
    assert epoch_stream(exs, batch_size, epochs, seed=0) == stream
