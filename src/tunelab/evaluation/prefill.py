"""The prompt pass of batched decoding, shared by evaluation's `generate` and the server's engine.

Rows of a batch are left-padded so that every row ends in the last column; the pass runs on runs of
rows of similar length (`prefill_chunks`), and their KV caches are laid side by side in buffers with
room for the tokens decoding will add (evaluation/kv_cache.py). See `prefill`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from tunelab.evaluation.kv_cache import reserved_cache
from tunelab.model.precision import Precision

PREFILL_MAX_PADDING = 128  # padding tokens a prompt-pass chunk may carry before a new chunk starts (see prefill)


def prefill_chunks(lengths: list[int], max_padding: int) -> list[range]:
    """Consecutive runs of rows for the prompt pass, each left-padded to its own longest row.

    A run grows while its padding (rows x longest - sum of lengths) stays within `max_padding`
    tokens. Rows arrive sorted by length, so a run's newest row is its longest. E.g. lengths
    [10, 10, 12, 40] with max_padding 8: [10, 10, 12] pads 4 tokens; adding 40 would pad 88,
    so 40 starts a second run.
    """
    chunks: list[range] = []
    start, longest, total = 0, 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) - (total + n) > max_padding:
            chunks.append(range(start, i))
            start, longest, total = i, 0, 0
        longest, total = max(longest, n), total + n
    if lengths:
        chunks.append(range(start, len(lengths)))
    return chunks


def _left_padded(suffixes: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, width): every row's last token in the last column."""
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids, mask


def prefill(
    body: torch.nn.Module,
    head: torch.nn.Module,
    config: PretrainedConfig,
    suffixes: list[list[int]],
    prefix_len: int,  # P: the suffixes' positions start here
    cached_prefix: int,  # prefix columns of the cache and mask: P when `prefix_cache` is copied into rows, else 0
    prefix_cache: DynamicCache | None,
    pad_id: int,
    precision: Precision,
    reserve: int,  # decode steps to come: slots kept free in every layer's cache (see kv_cache)
    each_chunk: Callable[[range], contextlib.AbstractContextManager] | None = None,  # around each chunk's forward
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """The prompt pass: (KV cache of the whole batch, first-token logits (B, vocab), attention mask (B, C + W)).

    Why in chunks: decoding wants many rows per step (a step's fixed cost is shared), but the
    prompt pass pays for every padded token, and one batch of 128 length-sorted rows can span
    10 to 88 tokens (Banking77: 51% of its prompt-pass tokens were padding). So the prompt pass
    runs on runs of similar length (`prefill_chunks`), and their caches are laid side by side,
    each row left-padded to the batch's width W behind the shared prefix (when the cache holds
    it, C = P; read in place, C = 0 and the rows start with their padding):

        cache row   [ P P P | 0 0 0 s s ]   mask [1 1 1 | 0 0 0 1 1]
    """
    width = max(len(s) for s in suffixes)
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (B, Hkv, C + W + reserve, D) keys, values
    logits: list[torch.Tensor] = []
    for rows in prefill_chunks([len(s) for s in suffixes], PREFILL_MAX_PADDING):
        chunk = suffixes[rows.start : rows.stop]
        chunk_width = max(len(s) for s in chunk)
        ids, suffix_mask = _left_padded(chunk, chunk_width, pad_id)
        mask = torch.cat([torch.ones((len(chunk), cached_prefix), dtype=torch.long), suffix_mask], dim=1)
        positions = prefix_len + (suffix_mask.cumsum(dim=1) - 1).clamp(min=0)  # pads get a dummy position
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        else:
            cache = DynamicCache(config=config)
        # The server says here which adapter each row of this chunk uses (serve/multi_lora.py).
        with precision.autocast(), each_chunk(rows) if each_chunk else contextlib.nullcontext():
            hidden = body(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            ).last_hidden_state  # (b, w, H)
            # The head on a contiguous (b, H) matrix: only the last position, one plain matmul.
            # (Through a PEFT wrapper, transformers' `logits_to_keep` slice became a batched matmul that
            # copied the whole 49,152 x 576 head weight per row: 4x slower generation on the 2-core AMX VM.)
            logits.append(head(hidden[:, -1].contiguous()))
        if not buffers:
            buffers = [_cache_buffers(layer, len(suffixes), cached_prefix + width + reserve) for layer in cache.layers]
        for (key_buffer, value_buffer), cached in zip(buffers, cache.layers):
            _place(key_buffer[rows.start : rows.stop], cached.keys, cached_prefix, width - chunk_width)
            _place(value_buffer[rows.start : rows.stop], cached.values, cached_prefix, width - chunk_width)
    _, suffix_mask = _left_padded(suffixes, width, pad_id)
    mask = torch.cat([torch.ones((len(suffixes), cached_prefix), dtype=torch.long), suffix_mask], dim=1)
    return reserved_cache(config, buffers, cached_prefix + width), torch.cat(logits), mask


def _cache_buffers(layer: DynamicLayer, rows: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, heads, _, dim = layer.keys.shape
    return tuple(kv.new_empty((rows, heads, slots, dim)) for kv in (layer.keys, layer.values))  # type: ignore[return-value]


def _place(dest: torch.Tensor, kv: torch.Tensor, prefix_len: int, gap: int) -> None:
    """Copy a chunk's (b, Hkv, P + w, D) cache into the batch's buffer rows: the prefix, then `gap`
    zero (masked) slots, then the suffix, so every row ends at the batch's width."""
    end = kv.shape[2] + gap
    dest[:, :, :prefix_len] = kv[:, :, :prefix_len]
    dest[:, :, prefix_len : prefix_len + gap].zero_()  # masked, but must be finite: 0 x NaN would poison the sum
    dest[:, :, prefix_len + gap : end] = kv[:, :, prefix_len:]
