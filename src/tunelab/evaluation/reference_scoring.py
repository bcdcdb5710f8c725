"""Teacher forcing on generation's prompt pass: the loss of a known answer without computing its prompt again.

Evaluation scores each contender's loss on the reference answers under the contender's own prompt.
Generation has just computed that prompt's KV cache, so the answer's tokens run on a copy of it
(`score_references`), and decoding goes on with the original. `generate(..., references=...)` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig

from tunelab.evaluation.kv_cache import reserved_cache
from tunelab.evaluation.prefill import PREFILL_MAX_PADDING, prefill_chunks
from tunelab.model.precision import Precision


@dataclass(frozen=True)
class Reference:
    """A known answer to score after a prompt (teacher forcing): its token ids, and which of them carry loss.

    E.g. SmolLM2's template after an answer "card_arrival": ids of "card", "_arr", "ival", "<|im_end|>",
    all trained. Token 0's loss is read off the prompt pass's last logits, token t's off one more pass
    over tokens 0..t-1 on the prompt's KV cache, so a prompt is computed once for its answer and its loss.
    """

    ids: tuple[int, ...]
    trained: tuple[bool, ...]


def score_references(
    body: torch.nn.Module,
    head: torch.nn.Module,
    cache: DynamicCache,  # the batch's prompts (left-padded, every row ending in the last column); not changed
    first_logits: torch.Tensor,  # (B, vocab): the prompt pass's last position, which predicts reference token 0
    mask: torch.Tensor,  # (B, C + W): the prompts' attention mask
    last_positions: torch.Tensor,  # (B, 1): each row's last prompt position
    references: list[Reference | None],
    pad_id: int,
    precision: Precision,
) -> list[tuple[float | None, int]]:
    """Per row, (summed cross-entropy of its reference's trained tokens, their count): teacher forcing.

    A pass over each row's reference but its last token, right-padded, on a copy of its prompt's cache
    (decoding goes on with the original):

        cache [ ... prompt ] + fed [ r0 r1 r2 pad ]      targets: r0 <- prompt's last logits,
                                                                  r1 <- fed r0, r2 <- fed r1, r3 <- fed r2

    Rows go through in runs of similar reference length (`prefill_chunks`), since answer lengths do not
    follow the prompt lengths the batch is sorted by (Banking77 labels: 1 to 17 tokens).
    """
    rows = [list(r.ids) if r is not None else [] for r in references]
    fed_lengths = [max(len(ids) - 1, 0) for ids in rows]  # tokens fed: all but each row's last
    hidden: dict[int, torch.Tensor] = {}  # row -> (its fed length, H)
    order = sorted((row for row in range(len(rows)) if fed_lengths[row]), key=lambda row: fed_lengths[row])
    for run in prefill_chunks([fed_lengths[row] for row in order], PREFILL_MAX_PADDING):
        chunk = [order[i] for i in run]
        width = max(fed_lengths[row] for row in chunk)
        fed = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        fed_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            fed[i, : fed_lengths[row]] = torch.tensor(rows[row][:-1], dtype=torch.long)
            fed_mask[i, : fed_lengths[row]] = 1
        index = torch.tensor(chunk)
        positions = last_positions[index] + 1 + torch.arange(width)[None, :]  # pads past a row's end are masked
        with precision.autocast():
            out = body(
                input_ids=fed, attention_mask=torch.cat([mask[index], fed_mask], dim=1), position_ids=positions,
                cache=_rows_of(cache, body.config, index, width), use_cache=True,
            ).last_hidden_state  # (b, width, H)
        hidden.update((row, out[i, : fed_lengths[row]]) for i, row in enumerate(chunk))
    first_rows = [row for row, r in enumerate(references) if r is not None and r.trained[0]]
    later = [(row, t) for row, r in enumerate(references) if r is not None
             for t in range(1, len(r.ids)) if r.trained[t]]
    parts, targets, owners = [], [], []
    if first_rows:
        parts.append(first_logits[first_rows].float())
        targets += [rows[row][0] for row in first_rows]
        owners += first_rows
    if later:
        states = torch.stack([hidden[row][t - 1] for row, t in later])  # (N, H): position t-1 predicts token t
        with precision.autocast():
            parts.append(head(states).float())  # (N, vocab)
        targets += [rows[row][t] for row, t in later]
        owners += [row for row, _ in later]
    sums = [0.0] * len(rows)
    if parts:
        losses = F.cross_entropy(torch.cat(parts), torch.tensor(targets), reduction="none").tolist()
        for row, loss in zip(owners, losses):
            sums[row] += loss
    return [(sums[row], sum(r.trained)) if r is not None else (None, 0) for row, r in enumerate(references)]


def _rows_of(cache: DynamicCache, config: PretrainedConfig, rows: torch.Tensor, room: int) -> DynamicCache:
    """A cache of copies of some rows of `cache`, with `room` free slots per layer to write into."""
    filled = cache.get_seq_length()
    buffers = []
    for layer in cache.layers:
        keys, values = layer.keys[rows], layer.values[rows]  # (b, Hkv, filled, D) copies
        pad = keys.new_empty((*keys.shape[:2], room, keys.shape[-1]))
        buffers.append((torch.cat([keys, pad], dim=2), torch.cat([values, pad], dim=2)))
    return reserved_cache(config, buffers, filled)
