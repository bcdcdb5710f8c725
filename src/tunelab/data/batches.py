"""Batches of tokenized examples: length-grouped order and right-padded tensors.

Length grouping: shuffle, cut into windows of `window` batches, sort each window by
length, cut into batches, shuffle the batches. Examples in a batch then have similar
lengths, so little compute goes to padding, while the order stays random at the
scale of an epoch (the same idea as transformers' `group_by_length`).

The largest batch (examples x longest example: what its padded tensors hold) then
trades places with the first, as transformers' `LengthGroupedSampler` puts its longest
example first, for two reasons. A run that does not fit in memory fails at its first
step, not hours in. And the allocator reaches its peak at once: the later, smaller steps
reuse those pages instead of faulting in fresh ones when a larger batch first comes
(a batch-64 run that met its widest batch late spent 6 s on that one step, 2-core AMX VM;
docs/benchmarks.md).

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
    shared_prefix: int = 0  # leading tokens identical in every row and never trained nor predicting a trained token
    # Packed rows (tunelab.data.pack): positions restart at 0 for each example (and for the trailing pads);
    # attention_mask still marks real tokens (1) and pads (0) for counting, but the model is given position_ids
    # instead of a mask, from which transformers builds a block-diagonal causal mask.
    position_ids: torch.Tensor | None = None  # (B, T) int64
    # Packed rows behind a shared prefix (tunelab.data.pack): which example each column holds, -1 in the
    # prefix, 0 for pads, 1.. for the row's examples; the loss builds the block mask from it.
    segment_ids: torch.Tensor | None = None  # (B, T) int64
    # Real input tokens when the layout holds some once for several examples (the prefix of packed rows
    # stands for every example of its row); None: count attention_mask.
    input_tokens: int | None = None

    @property
    def real_tokens(self) -> int:
        """Input tokens of the examples, each example's own prefix included (what tokens/s counts)."""
        return self.input_tokens if self.input_tokens is not None else int(self.attention_mask.sum())

    @property
    def trained_tokens(self) -> int:
        """Positions whose *next* token is trained (labels are shifted by one for the loss)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def loss_units(self) -> int:
        """What the loss sum is divided by over a whole step: trained tokens (DPO's PairBatch: pairs)."""
        return self.trained_tokens


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
    ordered = [batches[i] for i in order]
    if ordered:
        largest = max(range(len(ordered)), key=lambda k: len(ordered[k]) * max(lengths[i] for i in ordered[k]))
        ordered[0], ordered[largest] = ordered[largest], ordered[0]  # the first step is the largest
    return ordered


MIN_SHARED_PREFIX = 4  # tokens; computed once for a shorter prefix saves less than the bookkeeping costs (model/kernels/prefix.py)


def shared_prefix_length(examples: list[TokenizedExample]) -> int:
    """Leading tokens that every row has in common and that carry no loss.

    Two rows  [S S S S u1 u2 a1 E]  and  [S S S S v1 a1 E]  share 4 tokens (system
    prompt and template header). The prefix must stop before the position that
    predicts the first trained token, so its own hidden states never need logits.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(e.input_ids) for e in examples)
    for e in examples:
        trained_at = next((i for i, x in enumerate(e.labels) if x != IGNORE_INDEX), len(e.labels))
        n = min(n, trained_at - 1)  # position trained_at - 1 predicts the first trained token
        i = 0
        while i < n and e.input_ids[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(examples: list[TokenizedExample], pad_id: int, share_prefix: bool = True) -> Batch:
    """Right-pad examples into one batch; note the prefix all rows share (computed once in training)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels, shared_prefix_length(examples) if share_prefix else 0)
