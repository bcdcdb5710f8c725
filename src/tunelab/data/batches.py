"""Batches of tokenized examples: length-grouped order and right-padded tensors.

Length grouping: shuffle, cut into windows of `window` batches, sort each window by
length, cut into batches, shuffle the batches. Examples in a batch then have similar
lengths, so little compute goes to padding, while the order stays random at the
scale of an epoch (the same idea as transformers' `group_by_length`).

Collation pads on the right. Two examples of lengths 3 and 5:

    input_ids       [[a1 a2 a3 P  P ], [b1 b2 b3 b4 b5]]
    attention_mask  [[1  1  1  0  0 ], [1  1  1  1  1 ]]
    labels          [[-100 ... ], ...]   (-100 also at every pad)

Causal attention plus the mask means a real token never sees a pad, so padding
changes no logit of a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 0 at pads
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where not trained

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def trained_tokens(self) -> int:
        """Positions whose *next* token is trained (labels are shifted by one for the loss)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def length_grouped_order(
    lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 64
) -> list[list[int]]:
    """Indices of examples, as a list of batches with similar lengths inside each."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def collate(examples: list[TokenizedExample], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)
