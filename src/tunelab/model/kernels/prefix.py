"""The shared-prefix trick, in one place: tokens every row of a batch starts with are computed once.

Chat data repeats itself at the start of every row: the system prompt and the template's header
(Banking77: 12 of ~36 tokens; a few-shot prompt with the 77-label list: ~571 of ~607). A forward
pass over B rows computes those tokens B times for the same keys and values. Here they are computed
once, and every row's attention reads them. Where each piece lives:

    detection   data/batches.py `shared_prefix_length` (training rows: leading tokens identical in every
                row and carrying no loss, at least MIN_SHARED_PREFIX = 4); `common_prefix_length` below
                (generation prompts, at least MIN_GENERATION_PREFIX = 8: there the prefix costs a separate
                pass, so shorter ones are not worth it)
    layout      data/batches.py `collate` records the prefix length in `Batch.shared_prefix`;
                data/pack.py lays it once at the head of each packed row (`segment_ids`)
    forward     `body_hidden` below: the one function every loss and score calls (three ways, below)
    attention   kernels/attention.py: `prefix_in_batch` (training: the prefix's keys prepended to every
                row's), `behind_shared_prefix` (no gradients: a precomputed prefix read in place)
    generation  evaluation/generate.py: the prefix's KV cache built once, copied into rows when short,
                read in place when at least IN_PLACE_PREFIX = 128 tokens long

`body_hidden(body, batch, prefix_kv)` returns the hidden states of positions P..T-1 and takes one of:

1. `prefix_kv` given (evaluation losses over many batches sharing a long prefix): the prefix's keys and
   values, computed once by `shared_prefix_kv`, are read in place; no gradients.
2. `batch.shared_prefix` > 0 (training): with tunelab's attention, the prefix rides inside the batch
   (`_body_with_prefix_in_batch`); otherwise it runs first into a KV cache every row reads.
3. no prefix: the plain forward (packed rows are given `position_ids` and no mask).

With `model.kernels: reference` no prefix is ever recorded (collation gets `share_prefix=False`), so
only path 3 runs: the plain transformers forward the fast paths are tested against.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from tunelab.data.batches import Batch
from tunelab.data.pack import prefix_block_mask
from tunelab.model.kernels import attention
from tunelab.model.precision import Precision

MIN_GENERATION_PREFIX = 8  # tokens; generation computes a shorter common prefix with each row instead
IN_PLACE_PREFIX = 128  # tokens; a generation prefix this long is read in place, not copied into every row

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (keys, values) of a shared prefix: (1, Hkv, P, D)


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Leading token ids every prompt has in common: [[1, 2, 3], [1, 2, 4]] -> 2."""
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n


def reads_prefix_in_place(model: nn.Module) -> bool:
    """Whether `attention.behind_shared_prefix` applies: our attention, on CPU (its flash kernel is the CPU one)."""
    device = next(model.parameters()).device
    return device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == attention.NAME


@torch.no_grad()
def shared_prefix_kv(body: nn.Module, prefix: list[int], precision: Precision) -> PrefixKV:
    """Per layer, the (1, Hkv, P, D) keys and values of `prefix`: computed once, read in place by many rows."""
    cache = DynamicCache(config=body.config)
    with precision.autocast():
        body(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def body_hidden(body: PreTrainedModel, batch: Batch, prefix_kv: PrefixKV | None = None) -> torch.Tensor:
    """The last hidden states of positions P..T-1 of every row, (B, T-P, H), P = `batch.shared_prefix`.

    `body` is the transformer without its LM head (`model.load.body_and_head`). `prefix_kv`: the batch's
    shared prefix computed once for many batches (`shared_prefix_kv`); only without gradients.
    """
    p = batch.shared_prefix
    if prefix_kv is not None:
        if p != prefix_kv[0][0].shape[-2] or torch.is_grad_enabled():
            raise ValueError("prefix_kv must hold the batch's shared prefix, and serves forwards without gradients")
        b, t = batch.input_ids.shape
        with attention.behind_shared_prefix(prefix_kv):
            return body(
                input_ids=batch.input_ids[:, p:], attention_mask=batch.attention_mask[:, p:],
                position_ids=torch.arange(p, t).expand(b, -1), use_cache=False,
            ).last_hidden_state  # (B, T-P, H)
    if p:
        return _body_with_shared_prefix(body, batch)  # (B, T-P, H)
    if batch.position_ids is not None:  # packed: no 2D mask, so transformers derives the per-example blocks
        return body(  # use_cache=False: with a cache, transformers skips the packed-sequence detection
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
    return body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state


def _body_with_shared_prefix(body: nn.Module, batch: Batch) -> torch.Tensor:
    """Every row's hidden states after the shared prefix, the prefix computed once: (B, T-P, H).

    The same function of the weights as the plain forward (same positions, same attention), so the
    loss and gradients match; the prefix's gradient is summed over rows by autograd.

    With tunelab's attention and a prefix no longer than the rows' remainders, the prefix rides
    along in the same forward (`_body_with_prefix_in_batch`); otherwise it is run first, alone,
    into a KV cache that every row then reads. Models with a sliding window shorter than the rows
    also take that path: its masks are transformers' own.
    """
    p = batch.shared_prefix
    b, t = batch.input_ids.shape
    window = getattr(body.config, "sliding_window", None)
    if (getattr(body.config, "_attn_implementation", None) == attention.NAME and p <= t - p
            and (window is None or window >= t)):
        return _body_with_prefix_in_batch(body, batch)
    cache = DynamicCache(config=body.config)
    body(input_ids=batch.input_ids[:1, :p], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(b)  # (1, ...) -> (B, ...), differentiable
    if batch.segment_ids is not None:  # rows packed behind the prefix: each remainder sees the prefix and itself
        mask = prefix_block_mask(batch.segment_ids, p, body.get_input_embeddings().weight.dtype)  # (B, 1, T-P, T)
        positions = batch.position_ids[:, p:]  # (B, T-P)
    else:
        mask = batch.attention_mask  # (B, T)
        positions = torch.arange(p, t).expand(b, -1)  # (B, T-P)
    return body(
        input_ids=batch.input_ids[:, p:], attention_mask=mask, position_ids=positions,
        cache=cache, use_cache=True,
    ).last_hidden_state


def _body_with_prefix_in_batch(body: nn.Module, batch: Batch) -> torch.Tensor:
    """One forward with the prefix placed inside the batch: in a row's trailing padding when one has room
    for it (packed rows usually do), else as one more row, padded to the rows' width.

    Each layer prepends the prefix's keys/values to every row's own (`attention.prefix_in_batch`):
    the rows' tokens see the whole prefix and their own causal, unpadded (or same-segment, when
    packed) past; the prefix's tokens see only their own causal past.
    """
    p = batch.shared_prefix
    b, t = batch.input_ids.shape
    w = t - p
    dtype = body.get_input_embeddings().weight.dtype
    ids, positions = batch.input_ids[:, p:], torch.arange(p, t).expand(b, -1)  # (B, W)
    if batch.segment_ids is not None:  # rows packed behind the prefix
        allowed = prefix_block_mask(batch.segment_ids, p, dtype)[:, 0] == 0  # (B, W, P+W)
        positions, free = batch.position_ids[:, p:], batch.segment_ids[:, p:] == 0
    else:
        causal = torch.ones((w, w), dtype=torch.bool).tril()  # (W, W)
        own = causal & batch.attention_mask[:, None, p:].bool()  # (B, W, W): earlier, real keys
        allowed = torch.cat([torch.ones((b, w, p), dtype=torch.bool), own], dim=2)  # (B, W, P+W)
        free = batch.attention_mask[:, p:] == 0
    room = free.flip(1).long().cumprod(1).sum(1)  # (B,): trailing free columns of each row
    row = int(room.argmax())
    if int(room[row]) < p:  # no row has room: the prefix becomes one more row
        row, pad = b, batch.input_ids[:1, :1].expand(1, w)  # any token id: never attended
        ids, positions = torch.cat([ids, pad]), torch.cat([positions, torch.zeros((1, w), dtype=torch.long)])
        allowed = torch.cat([allowed, torch.zeros((1, w, p + w), dtype=torch.bool)])
    col = w - int(room[row]) if row < b else 0
    ids, positions, allowed = ids.clone(), positions.clone(), allowed.clone()
    ids[row, col : col + p] = batch.input_ids[0, :p]
    positions[row, col : col + p] = torch.arange(p)
    allowed[row, col : col + p] = False  # the prefix's tokens: their own causal past only
    allowed[row, col : col + p, p + col : p + col + p] = torch.ones((p, p), dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                  **attention.prefix_in_batch(row, col, p, w)).last_hidden_state
    return hidden[:b]  # (B, W, H)
