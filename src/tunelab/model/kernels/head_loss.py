"""The LM head and cross-entropy as one step, in row chunks: no (tokens x vocab) fp32 tensor is kept.

What the plain loss does, `cross_entropy(head(h).float(), targets)` under bf16 autocast, for N trained
tokens and a vocabulary of V: the head's bf16 logits (N, V), their fp32 copy, the fp32 log-softmax
that autograd keeps for backward, and in backward an fp32 and a bf16 logit gradient: about 16 bytes per
logit, all alive at the end of the forward, when the activations saved for backward are too. For the
bundled SmolLM2 (V = 49,152) and 129 trained tokens that is ~100 MB; for a 152k vocabulary (Qwen2.5)
and 1,000 trained tokens, ~2.4 GB.

Here, for each chunk of rows (at most `CHUNK_LOGITS` logits), the forward computes the logits, the
loss, and at once the logit gradient `softmax - onehot` and its products with the head: the gradient
of the hidden states (and of the head's weight, when it trains). Only those (N, d) and (V, d) results
are kept; a chunk's logits live in one fp32 buffer, updated in place. Backward only scales them by the
loss's incoming gradient. The same technique as Liger-Kernel's fused linear cross-entropy, written
here in plain torch ops because it is four lines of math on top of two matrix products, and the
dependency would be a Triton (GPU) package.

Numerics: the same products and casts as the plain path (logits rounded to the compute dtype, the
softmax in fp32, the logit gradient rounded to the compute dtype before its product with the head);
the loss's incoming gradient is applied after the product rather than before it, one more rounding
of the (N, d) gradient. `tests/model/kernels/test_head_loss.py` checks it against the plain path and, in fp64,
against finite differences.

What it buys is memory. On the 2-core AMX VM the head was no slower than the plain path and training
speed did not move beyond noise, while a step of 16 x 128 tokens, all trained, peaked at ~2.36 GB
instead of ~3.78 GB. The timings and peaks are in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from torch import nn

# Logits computed at once, at most (rows x vocab): a chunk's fp32 buffer is 4 bytes each, so 32 MB.
# Why not smaller: every chunk reads the whole head weight twice (SmolLM2's is 57 MB in bf16), so
# chunks under ~100 rows would make the head's products wait on memory instead of the arithmetic.
CHUNK_LOGITS = 8 * 2**20


def fused_head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor | None:
    """Sum over rows of cross-entropy(head(hidden), targets), or None when `head` is not a plain bias-free
    `nn.Linear` (a quantized or adapted head): the caller then takes the plain path.

    hidden: (N, d), the hidden states at trained positions; targets: (N,) token ids, all trained.
    Under autocast the products run in the autocast dtype, as `head(hidden)` would.
    """
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
    else:
        compute = torch.promote_types(hidden.dtype, head.weight.dtype)
    # Inside a Function's forward `needs_input_grad` is true even under no_grad: say whether a backward can come.
    return _FusedHeadLoss.apply(hidden, head.weight, targets, compute, torch.is_grad_enabled())


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute: torch.dtype, grad_enabled: bool) -> torch.Tensor:
        # Autocast stays on inside a Function's forward: every cast below is explicit instead.
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(ctx, hidden, weight, targets, compute, grad_enabled)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # (N, d) and (V, d), or empty where not needed
        scale = grad_loss.to(torch.float64 if grad_hidden.dtype == torch.float64 else torch.float32)
        return (
            (grad_hidden * scale).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None,
            (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
            None, None, None,
        )


def _forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             compute: torch.dtype, grad_enabled: bool) -> torch.Tensor:
    want_hidden, want_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
    accumulate = torch.float64 if compute == torch.float64 else torch.float32  # the softmax's dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(compute)  # (V, d): a copy only when the stored weight has another dtype
    rows = max(1, CHUNK_LOGITS // vocab)
    loss = torch.zeros((), dtype=accumulate, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=compute, device=hidden.device) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
    for start in range(0, n, rows):
        h = hidden[start : start + rows].to(compute)  # (C, d)
        t = targets[start : start + rows, None]  # (C, 1)
        logits = (h @ w.t()).to(accumulate)  # (C, V): rounded to `compute` by the product, as head(h) is
        top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
        picked = logits.gather(-1, t)  # (C, 1): the target's logit, before the buffer is overwritten
        probs = logits.sub_(top).exp_()  # in place: exp(logit - max)
        total = probs.sum(dim=-1, keepdim=True)  # (C, 1)
        loss += (top + total.log() - picked).sum()  # log-sum-exp - target logit, per row
        if want_hidden or want_weight:
            probs.div_(total).scatter_add_(-1, t, torch.full_like(picked, -1.0))  # softmax - onehot
            grad_logits = probs.to(compute)  # (C, V), rounded as autograd rounds the plain path's gradient
            if want_hidden:
                torch.mm(grad_logits, w, out=grad_hidden[start : start + rows])  # (C, d)
            if want_weight:
                grad_weight += (grad_logits.t() @ h).to(accumulate)  # (V, d)
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    ctx.save_for_backward(
        grad_hidden if want_hidden else hidden.new_empty(0), grad_weight if want_weight else weight.new_empty(0))
    return loss  # fp32 (fp64 for an fp64 model), as cross_entropy's
