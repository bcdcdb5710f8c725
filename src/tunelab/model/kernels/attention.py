"""Eager attention for grouped-query models without copying the KV cache.

Why write this by hand: transformers' eager attention calls `repeat_kv`, which
materialises every KV head `num_key_value_groups` times. SmolLM2 has 9 query heads
on 3 KV heads, so with a 640-token cache and 32 rows each decode step copied 46 MB
per layer: most of the base model's evaluation time (70% on the 2-core AMX VM). SDPA's
CPU kernel is no better here, and its flash-attention backward is slow for short training rows.

Instead, the query heads that share a KV head are stacked along the query axis,
so one matmul serves the whole group and K/V are read in place:

    query (B, H, T, D) -> (B, Hkv, G*T, D)   with G = H / Hkv (head h uses KV head h // G)
    scores = query @ key^T                   (B, Hkv, G*T, L)
    out    = softmax(scores + mask) @ value  (B, Hkv, G*T, D) -> (B, T, H, D)

It is registered with transformers' AttentionInterface under the name
"tunelab_gqa" and uses the eager (additive float) mask.

Within `generation_kernels()` (batched generation) it calls torch's SDPA with
`enable_gqa=True` instead, which also reads K/V in place and fuses the softmax: on the
2-core AMX VM it generated faster on both Banking77 prompts. Everything else keeps the
matmul form: SDPA's CPU backward trained slower there, and a loss computed without
gradients (validation, DPO's reference log-probs) must round exactly like the same loss
with them: DPO's rewards are 0 at initialisation only if the reference and the policy
run the same kernels. The measurements behind these choices are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "tunelab_gqa"
_generation: contextvars.ContextVar[bool] = contextvars.ContextVar("tunelab_generation_kernels", default=False)
# Per layer, the (1, Hkv, P, D) keys and values of a prompt prefix every row shares (see `behind_shared_prefix`).
_shared_prefix: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "tunelab_shared_prefix", default=None)


# Training: the keyword argument (passed through the model to every layer's attention) that holds the flat
# positions row * width + column of a shared prompt prefix inside the batch (see `prefix_in_batch`).
PREFIX_POSITIONS = "tunelab_prefix_positions"


def prefix_in_batch(row: int, column: int, length: int, width: int) -> dict[str, torch.Tensor]:
    """Keyword arguments for the model's forward: `row`'s columns `column`.. of a batch `width` wide hold a
    prompt prefix of `length` tokens that every row attends first.

    Each layer prepends those positions' keys and values to every row's own, so the attention
    covers (prefix | own) keys, under a (B, 1, T, length + T) mask that decides who sees what (the
    prefix's own tokens see only themselves). Gradients reach the prefix through the gather.
    Why: the alternative, a separate forward of the prefix into a KV cache, runs every layer's
    ~200 kernels a second time for a dozen tokens; that pass cost about as much as the
    12 x 16 tokens it saved (training, batch 16, 2-core AMX VM).
    Why a tensor passed as an argument, not a context variable: torch.compile traces a tensor
    argument into the graph (one graph for every batch), but stops at a context variable.
    """
    return {PREFIX_POSITIONS: row * width + column + torch.arange(length)}


def _prefix_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, L, D) keys or values -> (B, Hkv, P, D): the prefix's, at flat `positions` (row * L + column), for every row."""
    b, hkv, length, d = x.shape
    flat = x.transpose(1, 2).reshape(b * length, hkv, d)  # a view when x is laid out (B, L, Hkv, D), as projected
    return flat.index_select(0, positions).transpose(0, 1)[None].expand(b, -1, -1, -1)


@contextlib.contextmanager
def generation_kernels():
    """Within `with`: attention without gradients runs through SDPA (see the module docstring)."""
    token = _generation.set(True)
    try:
        yield
    finally:
        _generation.reset(token)


@contextlib.contextmanager
def behind_shared_prefix(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """Within `with`: every query also attends these keys/values, ahead of its own (generation, evaluation losses).

    `layers[i]` is layer i's (keys, values), each (1, Hkv, P, D): a prompt prefix all rows share,
    computed once. The KV cache and the attention mask then cover only what follows the prefix,
    so the prefix is held once instead of once per row. Why: the 77-label prompt is ~607 tokens,
    571 of them shared; copied into every row, the cache was 16x larger than the rows' own part,
    and every decode step copied (DynamicCache's concatenation) and read all of it.
    """
    token = _shared_prefix.set(layers)
    try:
        yield
    finally:
        _shared_prefix.reset(token)


def _attention_behind_prefix(
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, L, D): the rows' own keys, after the prefix
    value: torch.Tensor,  # (B, Hkv, L, D)
    prefix_key: torch.Tensor,  # (1, Hkv, P, D)
    prefix_value: torch.Tensor,  # (1, Hkv, P, D)
    attention_mask: torch.Tensor | None,  # (B or 1, 1, T, >= L) additive, over the rows' own keys
    scaling: float,
) -> torch.Tensor:
    """Softmax over [prefix keys | own keys] with the prefix read once for all rows; returns (B, T, H, D).

    Two flash-attention calls, merged by their log-sum-exps (the split-softmax identity):
    the prefix, which every query sees whole, with all rows' queries folded into one
    sequence, (1, H, B*T, D) against (1, Hkv, P, D); then each row's own keys, under the mask.

        out = (out_p * exp(lse_p - m) + out_s * exp(lse_s - m)) / (exp(lse_p - m) + exp(lse_s - m))

    torch's CPU flash kernel is called directly because SDPA does not return the log-sum-exp.
    Faster than the same softmax as matmuls, in decoding and most in the prompt pass (a 36-token
    prompt pass of 40 rows behind a 571-token prefix: 28.4 -> 7.6 ms, 2-core AMX VM; the decode
    step is in docs/benchmarks.md).
    """
    b, h, t, d = query.shape
    folded = query.transpose(0, 1).reshape(1, h, b * t, d)  # (1, H, B*T, D): every row's queries, one sequence
    out_p, lse_p = _flash(folded, prefix_key, prefix_value, scale=scaling)  # (1, H, B*T, D), (1, H, B*T)
    out_p = out_p.view(h, b, t, d).transpose(0, 1)  # (B, H, T, D)
    lse_p = lse_p.view(h, b, t).transpose(0, 1)  # (B, H, T)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out_s, lse_s = _flash(query, key, value, attn_mask=mask, scale=scaling)  # (B, H, T, D), (B, H, T)
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - top)[..., None], torch.exp(lse_s - top)[..., None]  # (B, H, T, 1) fp32
    out = (out_p.float() * w_p + out_s.float() * w_s) / (w_p + w_s)
    return out.to(query.dtype).transpose(1, 2).contiguous()  # (B, T, H, D)


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention: (output, log-sum-exp per query in fp32); grouped-query K/V read in place."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, **kwargs)


class _SoftmaxSavingRounded(torch.autograd.Function):
    """`softmax(scores)` in fp32, returned in `dtype`; backward from that rounded output.

    Why: `softmax(scores, dtype=float32).to(bf16)` makes autograd keep the fp32 softmax for
    backward beside the bf16 copy the value product keeps: the largest tensor a layer saves
    in packed training, (rows, KV heads, 3 x 162 queries, 175 keys) x 4 bytes, 180 MB over
    SmolLM2's 30 layers on a 6-row step. The softmax gradient `p ⊙ (g - Σ g ⊙ p)` is computed
    in fp32 from the bf16 `p` instead (relative error 2^-9 in p, the rounding every bf16
    activation already has).
    """

    @staticmethod
    def forward(ctx: object, scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        accumulate = torch.float64 if scores.dtype == torch.float64 else torch.float32
        probs = torch.softmax(scores, dim=-1, dtype=accumulate).to(dtype)
        ctx.save_for_backward(probs)
        ctx.accumulate, ctx.scores_dtype = accumulate, scores.dtype
        return probs

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (probs,) = ctx.saved_tensors
        p, g = probs.to(ctx.accumulate), grad.to(ctx.accumulate)
        return (p * (g - (g * p).sum(-1, keepdim=True))).to(ctx.scores_dtype), None


def softmax_saving_rounded(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last axis, computed in fp32 and returned in `dtype` (see `_SoftmaxSavingRounded`)."""
    if dtype in (torch.float32, torch.float64):  # nothing rounded: autograd's own softmax is the same
        return torch.softmax(scores, dim=-1, dtype=dtype)
    return _SoftmaxSavingRounded.apply(scores, dtype)


def grouped_query_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, L, D)
    value: torch.Tensor,  # (B, Hkv, L, D)
    attention_mask: torch.Tensor | None,  # (B or 1, 1, T, L) additive, large negative where masked
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    positions = kwargs.get(PREFIX_POSITIONS)
    # The context variables serve forwards without gradients (evaluation, generation), which run eager; a layer
    # under torch.compile is a training layer (`compiled_kernels.use_compiled_layers`, `eager_layers`), and
    # reading a context variable would break its graph in two.
    compiling = torch.compiler.is_compiling()
    prefix = None if positions is not None or compiling else _shared_prefix.get()
    if prefix is not None:
        prefix_key, prefix_value = prefix[module.layer_idx]
        return _attention_behind_prefix(query, key, value, prefix_key, prefix_value, attention_mask, scaling), None
    if positions is not None:  # (the prefix's keys | own keys) for every row; the mask says who sees what
        key = torch.cat([_prefix_rows(key, positions), key], dim=2)
        value = torch.cat([_prefix_rows(value, positions), value], dim=2)
    elif not compiling and _generation.get() and not torch.is_grad_enabled() and dropout == 0.0:
        mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
        if key.dtype != query.dtype:
            # A cache kept in another dtype than the model computes in (serving keeps fp32 keys and values under
            # bf16 weights: serve/engine.py) decides the attention's dtype, autocast or not; the output goes back
            # to the model's dtype.
            with torch.autocast(query.device.type, enabled=False):
                out = nn.functional.scaled_dot_product_attention(
                    query.to(key.dtype), key, value, attn_mask=None if mask is None else mask.to(key.dtype)
                    if mask.is_floating_point() else mask, scale=scaling, enable_gqa=True)  # (B, H, T, D)
            return out.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, T, H, D)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                         enable_gqa=True)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)
    b, h, t, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    q = query.reshape(b, hkv, g * t, d)  # heads h = kv * G + j are contiguous, so this groups them
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling  # (B, Hkv, G*T, L)
    if attention_mask is not None:
        length = scores.shape[-1]
        mask = attention_mask[:, :, :, :length]  # (B, 1, T, L)
        scores = (scores.view(b, hkv, g, t, length) + mask[:, :, None]).view(b, hkv, g * t, length)
    probs = softmax_saving_rounded(scores, query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)  # (B, Hkv, G*T, D)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None  # (B, T, H, D)


AttentionInterface.register(NAME, grouped_query_attention)
AttentionMaskInterface.register(NAME, eager_mask)
