"""The engine's batch KV cache: rows join (prompts wider than the batch shift it), decode, leave and the
buffers are reallocated, and every row still reads exactly its own tokens, and finite values where it is masked.

Fresh buffers are filled with NaN here (the allocator may hand back anything): a slot read before it was written
would show."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from tunelab.serve import batch_cache
from tunelab.serve.batch_cache import BatchCache

HEADS, DIM, LAYERS = 2, 4, 2


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    monkeypatch.setattr(batch_cache, "_uninitialized", lambda like, shape: like.new_full(shape, float("nan")))
    monkeypatch.setattr(batch_cache, "GROWTH", 3)  # reallocate often


def _config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       hidden_size=HEADS * DIM, intermediate_size=16, vocab_size=32)


class Tracker:
    """The cache under test beside what each request's row should hold: its tokens' keys, oldest first."""

    def __init__(self, rows_cap: int) -> None:
        self.cache = BatchCache(_config(), rows_cap, dtype=torch.float32)
        self.expected: list[list[torch.Tensor]] = []  # per active row: (LAYERS, HEADS, DIM) per token
        self.counter = 0.0

    def _token(self) -> torch.Tensor:
        self.counter += 1
        return torch.full((LAYERS, HEADS, DIM), self.counter) + torch.arange(DIM) / 10

    def join(self, lengths: list[int]) -> None:
        """A prefilled batch of prompts, left-padded to the longest, as evaluation.prefill returns it."""
        width = max(lengths)
        tokens = [[self._token() for _ in range(n)] for n in lengths]
        prompt = DynamicCache(config=_config())
        mask = torch.zeros((len(lengths), width), dtype=torch.long)
        for layer in range(LAYERS):
            keys = torch.full((len(lengths), HEADS, width, DIM), 7.0)  # padding: any finite value, masked
            for row, row_tokens in enumerate(tokens):
                for j, token in enumerate(row_tokens):
                    keys[row, :, width - len(row_tokens) + j] = token[layer]
            prompt.update(keys, keys.clone(), layer)
        for row, n in enumerate(lengths):
            mask[row, width - n :] = 1
        self.cache.add(prompt, mask, list(range(len(lengths))))
        self.expected.extend(tokens)

    def step(self) -> None:
        cache, mask = self.cache.step_view()
        assert mask.shape == (self.cache.n, self.cache.width + 1)
        new = [self._token() for _ in range(self.cache.n)]
        for layer in range(LAYERS):
            keys = torch.stack([t[layer] for t in new])[:, :, None, :]  # (n, HEADS, 1, DIM)
            cache.layers[layer].update(keys, keys.clone())
        self.cache.stepped()
        for row, token in enumerate(new):
            self.expected[row].append(token)

    def leave(self, row: int) -> None:
        moved = self.cache.remove(row)
        if moved is not None:
            self.expected[row] = self.expected[moved]
        self.expected.pop()

    def check(self) -> None:
        c = self.cache
        mask = c.mask[: c.n, : c.width]
        for layer, (keys, values) in enumerate(c.buffers):
            for kv in (keys, values):
                visible = kv[: c.n, :, : c.width]
                assert torch.isfinite(visible).all(), "a slot an attention step reads was never written"
                for row in range(c.n):
                    held = visible[row][:, mask[row].bool()].transpose(0, 1)  # (tokens, HEADS, DIM)
                    assert torch.equal(held, torch.stack([t[layer] for t in self.expected[row]])), (layer, row)


def test_rows_join_step_leave_and_reallocate_without_reading_unwritten_slots():
    t = Tracker(rows_cap=6)
    t.join([3, 2])
    t.check()
    for _ in range(4):  # past GROWTH: the buffers are reallocated
        t.step()
    t.check()
    t.join([9, 1, 4])  # wider than the batch: every row shifts right
    t.check()
    t.leave(0)
    t.step()
    t.check()
    t.leave(t.cache.n - 1)
    t.leave(0)
    for _ in range(5):
        t.step()
    t.check()
    t.join([2])
    t.step()
    t.check()
    while t.cache.n:
        t.leave(0)
    t.join([5, 5])  # an empty batch starts over
    t.step()
    t.check()
