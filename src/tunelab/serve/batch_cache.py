"""The KV cache of every running request, in one batch that rows join and leave between steps.

Continuous batching needs rows of different ages in one forward pass. The layout is the one
evaluation decodes with (evaluation/generate.py), kept alive across requests: every row's
tokens end at the same column, shorter histories are left-padded and masked, and a decode
step writes every row's new token into the next column (evaluation/kv_cache.ReservedLayer):

    per layer: keys, values (rows_cap, Hkv, cap, D); active rows are 0..n-1; columns 0..width-1 filled

               column  0 1 2 3 4 5 | 6 <- the next step writes here
      row 0 (old)      a a a a a a |        mask 1 1 1 1 1 1
      row 1 (joined)   0 0 0 b b b |        mask 0 0 0 1 1 1
      row 2 (joined)   0 c c c c c |        mask 0 1 1 1 1 1

A row joins by copying its prompt's cache (from `evaluation.prefill.prefill`) right-aligned to
`width`; a prompt wider than `width` first shifts everyone right. A row leaves by moving the last
active row into its place, so active rows stay 0..n-1 and a step's view (`buffers[:n, :, :width]`)
needs no copy. Each row keeps its own positions (position ids), so padding changes no result.
When the columns run out, the buffers are reallocated with room for more steps, dropping the
leading columns no active row uses (rows that started early have left): the attention then reads
only what some row needs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig

from tunelab.evaluation.kv_cache import reserved_cache

GROWTH = 64  # columns added at each reallocation: one copy of the cache every GROWTH decode steps


class BatchCache:
    def __init__(self, config: PretrainedConfig, rows_cap: int, dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.rows_cap = rows_cap
        self.dtype = dtype  # of the buffers; None: the first prompt cache's
        self.n = 0  # active rows
        self.width = 0  # filled columns
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (keys, values)
        self.mask = torch.zeros((rows_cap, 0), dtype=torch.long)  # (rows_cap, cap): 1 where a row has a token

    @property
    def cap(self) -> int:
        return self.mask.shape[1]

    def step_view(self) -> tuple[DynamicCache, torch.Tensor]:
        """(cache of the active rows, their attention mask including the column the step writes)."""
        self._make_room(left=0, right=1)
        self.mask[: self.n, self.width] = 1
        views = [(k[: self.n], v[: self.n]) for k, v in self.buffers]
        return reserved_cache(self.config, views, self.width), self.mask[: self.n, : self.width + 1]

    def stepped(self) -> None:
        """The step wrote one column into every active row."""
        self.width += 1

    def add(self, cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> list[int]:
        """Append rows `rows` of a prefilled `cache` (b, Hkv, w, D) with mask (b, w); returns their batch rows."""
        w = mask.shape[1]
        assert self.n + len(rows) <= self.rows_cap, "the engine admits no more rows than rows_cap"
        if not self.buffers:
            self.buffers = [
                tuple(kv.new_zeros((self.rows_cap, kv.shape[1], 0, kv.shape[3]), dtype=self.dtype or kv.dtype)
                      for kv in (layer.keys, layer.values))
                for layer in cache.layers
            ]
        self._make_room(left=w, right=1)
        start = self.width - w
        placed = list(range(self.n, self.n + len(rows)))
        index = torch.tensor(rows)
        for (keys, values), layer in zip(self.buffers, cache.layers):
            keys[placed[0] : placed[-1] + 1, :, :start].zero_()  # masked, but must be finite (0 x NaN is NaN)
            values[placed[0] : placed[-1] + 1, :, :start].zero_()
            keys[placed[0] : placed[-1] + 1, :, start : self.width] = layer.keys[index, :, :w]
            values[placed[0] : placed[-1] + 1, :, start : self.width] = layer.values[index, :, :w]
        self.mask[placed[0] : placed[-1] + 1] = 0
        self.mask[placed[0] : placed[-1] + 1, start : self.width] = mask[index]
        self.n += len(rows)
        return placed

    def remove(self, row: int) -> int | None:
        """Drop `row`; the last active row moves into its place. Returns the row that moved (or None)."""
        last = self.n - 1
        moved = None
        if row != last:
            for keys, values in self.buffers:
                keys[row, :, : self.width] = keys[last, :, : self.width]
                values[row, :, : self.width] = values[last, :, : self.width]
            self.mask[row] = self.mask[last]
            moved = last
        self.mask[last] = 0
        self.n -= 1
        if self.n == 0:
            self.width = 0  # an empty batch starts over at column 0
        return moved

    def _make_room(self, left: int, right: int) -> None:
        """Make width >= left (shifting the rows right) and cap - width >= right, dropping unused leading columns."""
        if self.width >= left and self.cap - self.width >= right:
            return
        used = self.mask[: self.n, : self.width].any(dim=0).nonzero()
        start = int(used[0]) if self.n and used.numel() else self.width  # first column any active row uses
        kept = self.width - start
        new_width = max(kept, left)
        offset = new_width - kept
        cap = new_width + max(right, GROWTH)
        mask = torch.zeros((self.rows_cap, cap), dtype=torch.long)
        mask[: self.n, offset:new_width] = self.mask[: self.n, start : self.width]
        buffers = []
        for keys, values in self.buffers:
            pair = []
            for kv in (keys, values):
                grown = _uninitialized(kv, (self.rows_cap, kv.shape[1], cap, kv.shape[3]))
                grown[: self.n, :, :offset].zero_()  # masked, but must be finite (0 x NaN is NaN)
                grown[: self.n, :, offset:new_width] = kv[: self.n, :, start : self.width]
                pair.append(grown)
            buffers.append(tuple(pair))
        self.buffers, self.mask, self.width = buffers, mask, new_width


def _uninitialized(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A buffer left as the allocator gives it. Zero-filling it all would touch every row of `rows_cap` and every
    spare column at each reallocation (hundreds of MB for SmolLM2 at 32 rows), most of it memory fresh from the
    kernel; nothing reads a slot before it is written: a joining row's columns are zeroed or copied in `add`,
    a step writes its column before attending to it, and views stop at the active rows."""
    return like.new_empty(shape)
