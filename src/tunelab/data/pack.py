"""Padding-free packing: the examples of one micro-batch, laid end to end in fewer rows.

Packing changes the layout of a micro-batch, never what it trains on: the same
examples, the same trained tokens, the same loss. Each example keeps its own
positions (restarting at 0), and the model is called with `position_ids` and NO
attention mask, from which transformers derives a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`: a new block starts wherever a
position is not the previous one + 1), so no token attends another example.

Worked example, pack_length 8 (`-` is IGNORE_INDEX, P the pad token):

    A = a1 a2 a3 a4 a5   labels  -  -  a3 a4 a5
    B = b1 b2 b3         labels  b1 b2 b3          (a raw-text example: all trained)
    C = c1 c2 c3 c4      labels  -  -  c3 c4

    first-fit decreasing: A (5) opens row 0; C (4) does not fit beside it and opens
    row 1; B (3) fills row 0.

                    row 0                       row 1
    input_ids       a1 a2 a3 a4 a5 b1 b2 b3     c1 c2 c3 c4 P  P  P  P
    position_ids    0  1  2  3  4  0  1  2      0  1  2  3  0  1  2  3
    labels          -  -  a3 a4 a5 -  b2 b3     -  -  c3 c4 -  -  -  -
    attention_mask  1  1  1  1  1  1  1  1      1  1  1  1  0  0  0  0

The loss at position t predicts labels[t+1], so b1's label is forced to `-`: a5 must
not learn to predict the next example's first token (unpacked, a row's first label is
never a target either, so the trained tokens are the same). The pads restart at
position 0 too, making them a block of their own that no real token attends.
attention_mask only counts real tokens (`Batch.real_tokens`); it is not given to the
model, because a 2D mask switches transformers' packed detection off.

The forward must also pass `use_cache=False`: with a KV cache (LlamaConfig's
default `use_cache=True` creates one) transformers skips the detection and the
examples of a row silently attend each other.

When every example starts with the same untrained tokens (a system prompt), rows are
laid out differently: the prefix once at the head of each row, the remainders packed
behind it with positions continuing after it, and an explicit block mask built from
`segment_ids` (`_packed_behind_prefix`, `prefix_block_mask`). The prefix is then
computed once per step, as on the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.batches import Batch, shared_prefix_length
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.errors import TunelabError


def pack_layout(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Rows of example indices, first-fit decreasing: longest first, each into the first row it fits.

    Deterministic (ties keep input order). An example longer than pack_length gets a row
    of its own. pack_layout([5, 3, 4], 8) == [[0, 1], [2]].
    """
    if pack_length < 1:
        raise TunelabError(f"pack_length is {pack_length}, but a row must hold at least one token",
                           fix="set train.pack_length to a positive number of tokens, e.g. the data's max_length")
    assert lengths and min(lengths) > 0, "every example needs at least one token"
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep input order
        row = next((r for r, left in enumerate(free) if lengths[i] <= left), None)
        if row is None:
            rows.append([i])
            free.append(max(pack_length - lengths[i], 0))
        else:
            rows[row].append(i)
            free[row] -= lengths[i]
    return rows


def row_capacity(lengths: list[int], pack_length: int | None) -> int:
    """Tokens a row of this micro-batch may hold: its longest example, or pack_length where that is more.

    Why at least the longest example: the batch is as wide as its widest row, and the row that
    holds the longest example is at least that wide; every row is padded to the batch's width
    anyway, so filling rows up to it adds no position and leaves fewer rows. Lengths [9, 4, 3, 2]
    with pack_length 8: rows of at most 8 would be [9], [4, 3], [2], three rows 9 wide; rows of at
    most 9 are [9], [4, 3, 2], two.

    pack_length None (the default): rows exactly as wide as the longest example. On a CPU, where
    attention is dense over a packed row (block-diagonal mask), a position's attention costs
    grow with its row's width, so wider rows than the batch needs are slower (a LoRA step of
    batch 16: 638 ms at the longest example's width, 801 at 162 tokens, 2-core AMX VM; the
    sweep is in docs/benchmarks.md).
    """
    longest = max(lengths)
    return longest if pack_length is None else max(pack_length, longest)


def packed_rows(lengths: list[int], pack_length: int | None, prefix: int = 0) -> tuple[list[list[int]], int]:
    """The rows (example indices) of one micro-batch and the batch's width, as `collate_packed` lays them out.

    With a shared prefix of `prefix` tokens, each row holds one copy of it and then the
    examples' remainders, so the remainders are what is packed.
    """
    rest = [n - prefix for n in lengths]
    capacity = row_capacity(rest, None if pack_length is None else max(pack_length - prefix, 1))
    rows = pack_layout(rest, capacity)
    return rows, prefix + max(sum(rest[i] for i in row) for row in rows)  # > capacity only for an oversize example


def collate_packed(
    examples: list[TokenizedExample], pad_id: int, pack_length: int | None = None, share_prefix: bool = True
) -> Batch:
    """Pack one micro-batch into as few rows as first-fit decreasing finds, each of at most pack_length tokens
    (or of the micro-batch's longest example, where that is longer: `row_capacity`).

    With a prefix every example shares (`shared_prefix_length`: a system prompt), it is laid down once
    at the head of each row and only the remainders are packed behind it (see `_packed_behind_prefix`).
    """
    prefix = shared_prefix_length(examples) if share_prefix else 0
    if prefix:
        return _packed_behind_prefix(examples, pad_id, pack_length, prefix)
    rows, width = packed_rows([len(e.input_ids) for e in examples], pack_length)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)  # (R, W)
    mask = torch.zeros(shape, dtype=torch.long)  # (R, W), 1 on real tokens
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, W)
    positions = torch.zeros(shape, dtype=torch.long)  # (R, W), restarting at 0 per example and for the pad run
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e = examples[i]
            end = start + len(e.input_ids)
            ids[r, start:end] = torch.tensor(e.input_ids)
            mask[r, start:end] = 1
            labels[r, start:end] = torch.tensor(e.labels)
            labels[r, start] = IGNORE_INDEX  # the previous example's last token must not predict this one's first
            positions[r, start:end] = torch.arange(end - start)
            start = end
        positions[r, start:] = torch.arange(width - start)  # pads: their own block, attended by no real token
    return Batch(ids, mask, labels, shared_prefix=0, position_ids=positions)


def _packed_behind_prefix(
    examples: list[TokenizedExample], pad_id: int, pack_length: int | None, prefix: int
) -> Batch:
    """Rows of [shared prefix | remainder | remainder | ... | pads]: the prefix is computed once per step.

    Why: chat data with a fixed system prompt repeats it in every example (Banking77: 12 of ~40
    tokens). Unpacked, the loss already runs a shared prefix once per batch (`model/kernels/prefix.py`); plain
    packing would give that up. Here each remainder sits behind one copy of the prefix, its
    positions continuing at P as if the prefix were its own, and attends the prefix plus the
    earlier tokens of its own remainder; `segment_ids` says which is which, and the loss turns it
    into that block mask. Worked example, prefix S S (P = 2), remainders a1 a2 a3 and b1 b2:

        input_ids    S  S  a1 a2 a3 b1 b2 P        segment_ids  -1 -1 1 1 1 2 2 0
        position_ids 0  1  2  3  4  2  3  2        (pads: 0, a block of their own after the prefix)

    Loss and gradients equal the unpacked ones: the same queries see the same keys at the same
    positions. `input_tokens` counts the prefix once per example, as unpacked batches do.
    """
    rest = [len(e.input_ids) - prefix for e in examples]  # >= 1: the prefix stops before a trained token's predictor
    rows, width = packed_rows([len(e.input_ids) for e in examples], pack_length, prefix)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)  # (R, P + W)
    mask = torch.zeros(shape, dtype=torch.long)  # (R, P + W), 1 on real tokens (the prefix once per row)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, P + W)
    positions = torch.zeros(shape, dtype=torch.long)  # (R, P + W)
    segments = torch.zeros(shape, dtype=torch.long)  # (R, P + W): -1 prefix, 0 pads, k the row's k-th example
    head = torch.tensor(examples[0].input_ids[:prefix])
    for r, row in enumerate(rows):
        ids[r, :prefix], mask[r, :prefix], segments[r, :prefix] = head, 1, -1
        positions[r, :prefix] = torch.arange(prefix)
        start = prefix
        for k, i in enumerate(row, start=1):
            e = examples[i]
            end = start + rest[i]
            ids[r, start:end] = torch.tensor(e.input_ids[prefix:])
            mask[r, start:end] = 1
            labels[r, start:end] = torch.tensor(e.labels[prefix:])
            labels[r, start] = IGNORE_INDEX  # never trained (see shared_prefix_length); also: a boundary
            positions[r, start:end] = torch.arange(prefix, prefix + rest[i])
            segments[r, start:end] = k
            start = end
        positions[r, start:] = torch.arange(prefix, prefix + width - start)  # pads: positions of no consequence
    tokens = sum(len(e.input_ids) for e in examples)
    return Batch(ids, mask, labels, shared_prefix=prefix, position_ids=positions, segment_ids=segments,
                 input_tokens=tokens)


def prefix_block_mask(segment_ids: torch.Tensor, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of rows packed behind a prefix: (R, 1, W, P + W) for the W columns after it.

    A query may see every prefix column, and the columns of its own segment up to itself; 0 where
    allowed, the dtype's minimum elsewhere (transformers' eager-mask convention). Pads (segment 0)
    see the prefix and the pads before them, so no row of the softmax is empty.
    """
    rest = segment_ids[:, prefix:]  # (R, W)
    width = rest.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (W, W)
    same = rest[:, :, None] == rest[:, None, :]  # (R, W, W)
    allowed = torch.cat([torch.ones((rest.shape[0], width, prefix), dtype=torch.bool), same & causal], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (R, 1, W, P + W)


@dataclass(frozen=True)
class PackSummary:
    """How well packing filled the rows, for the run log."""

    micro_batches: int
    examples: int
    rows: int  # packed rows over all micro-batches
    real_tokens: int
    packed_slots: int  # sum over micro-batches of rows x width
    padded_slots: int  # the same without packing: batch size x longest example

    @property
    def fill(self) -> float:
        """Real tokens / (rows x width): the share of computed positions that are not padding."""
        return self.real_tokens / max(self.packed_slots, 1)

    @property
    def unpacked_fill(self) -> float:
        return self.real_tokens / max(self.padded_slots, 1)

    def describe(self) -> str:
        return (f"{self.examples} examples in {self.rows} rows over {self.micro_batches} micro-batches "
                f"({self.rows / max(self.micro_batches, 1):.1f} rows each), fill {self.fill:.0%} "
                f"(unpacked {self.unpacked_fill:.0%})")


def pack_summary(
    micro_batches: list[list[TokenizedExample]], pack_length: int | None, share_prefix: bool = True
) -> PackSummary:
    """Fill efficiency of packing every micro-batch of a run as `collate_packed` lays it out, from lengths alone.

    Real tokens count the positions that hold one (a shared prefix once per row); unpacked is
    every example padded to its micro-batch's longest.
    """
    rows = real = packed = padded = examples = 0
    for mb in micro_batches:
        lengths = [len(e.input_ids) for e in mb]
        prefix = shared_prefix_length(mb) if share_prefix else 0
        layout, width = packed_rows(lengths, pack_length, prefix)
        rows, examples = rows + len(layout), examples + len(mb)
        real += len(layout) * prefix + sum(lengths) - len(mb) * prefix
        packed, padded = packed + len(layout) * width, padded + len(mb) * max(lengths)
    return PackSummary(len(micro_batches), examples, rows, real, packed, padded)
