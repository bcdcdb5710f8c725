"""What training recipes share: precision choice, the loss, the optimizer and schedule.

The loss computes the LM head only where a token is trained. With prompt-heavy
chat data (Banking77: ~5 trained of ~40 tokens) this skips most of the
(tokens x 49,152) logits and their backward pass, and it is mathematically the
same loss: positions with label -100 contribute nothing either way.
The training loss then runs the head and the cross-entropy together, in row chunks
(`head_loss`), so no (tokens x vocab) fp32 tensor is kept for backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from peft import PeftModel
from transformers import (
    DynamicCache, PreTrainedModel, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup,
)

from tunelab.model.kernels import attention
from tunelab.model.kernels.compiled import eager_layers
from tunelab.data.batches import Batch
from tunelab.data.pack import prefix_block_mask
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.model.kernels.head_loss import fused_head_loss


PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (keys, values) of a shared prefix: (1, Hkv, P, D)


@dataclass(frozen=True)
class Precision:
    bf16: bool
    device: str
    reason: str  # said in the run log

    @property
    def weights_dtype(self) -> torch.dtype:
        """Frozen base weights: bf16 when computing in bf16 (trainable params stay fp32)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)


def choose_precision(setting: str) -> Precision:
    """'auto' picks bf16 where the hardware runs bf16 matrix products fast, and says why."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "fp32":
        return Precision(False, device, "fp32 (set in config)")
    if setting == "bf16":
        return Precision(True, device, "bf16 autocast (set in config)")
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Precision(ok, device, "bf16 autocast: CUDA supports bf16" if ok else "fp32: this GPU lacks bf16")
    if torch.cpu._is_amx_tile_supported():
        return Precision(True, device, "bf16 autocast: this CPU has AMX (bf16 matmul ~4x fp32)")
    return Precision(False, device, "fp32: this CPU has no AMX, where bf16 is not faster")


def body_and_head(model: PreTrainedModel | PeftModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states out) and the LM head, through a PEFT wrapper if any."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    assert softcap is None, "models with logit soft-capping need the head applied as the model does"
    return base.base_model, base.get_output_embeddings()


def token_loss_sum(model: PreTrainedModel | PeftModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over trained positions, and how many there were.

    Returning a sum (not a mean) lets the caller divide by the trained tokens of the
    whole accumulated batch, so 1 x 4 accumulation equals a batch of 4 exactly.
    """
    hidden, targets, head = trained_hidden(model, batch)
    loss = fused_head_loss(hidden, head, targets)  # the head and the loss in row chunks (see head_loss)
    if loss is None:  # a head that is not a plain linear layer (quantized, adapted): the plain path
        loss = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return loss, int(targets.numel())


def trained_logits(
    model: PreTrainedModel | PeftModel, batch: Batch, prefix_kv: PrefixKV | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a trained token (N, vocab) in fp32, and those tokens (N,).

    `prefix_kv`: the batch's shared prefix, already computed once for many batches (`shared_prefix_kv`,
    no gradients): its keys and values are read in place (`attention.behind_shared_prefix`).
    """
    hidden, targets, head = trained_hidden(model, batch, prefix_kv)
    return head(hidden).float(), targets


def trained_hidden(
    model: PreTrainedModel | PeftModel, batch: Batch, prefix_kv: PrefixKV | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The last hidden states at the positions that predict a trained token (N, hidden), those tokens (N,),
    and the LM head that maps the one to logits. `prefix_kv`: see `trained_logits`."""
    body, head = body_and_head(model)
    p = batch.shared_prefix
    if prefix_kv is not None:
        assert p == prefix_kv[0][0].shape[-2] and not torch.is_grad_enabled(), "a precomputed prefix, no gradients"
        b, t = batch.input_ids.shape
        with attention.behind_shared_prefix(prefix_kv):
            hidden = body(
                input_ids=batch.input_ids[:, p:], attention_mask=batch.attention_mask[:, p:],
                position_ids=torch.arange(p, t).expand(b, -1), use_cache=False,
            ).last_hidden_state  # (B, T-P, H)
    elif p:
        hidden = _body_with_shared_prefix(body, batch)  # (B, T-P, H): hidden states of positions P..T-1
    elif batch.position_ids is not None:  # packed: no 2D mask, so transformers derives the per-example blocks
        hidden = body(  # use_cache=False: with a cache, transformers skips the packed-sequence detection
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
    else:
        hidden = body(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
    targets = batch.labels[:, p + 1 :]  # (B, T-P-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    return hidden[:, :-1][keep], targets[keep], head  # (N, hidden), (N,): N = trained tokens only


def _body_with_shared_prefix(body: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Every row's hidden states after the shared prefix, the prefix computed once: (B, T-P, H).

    The same function of the weights as the plain forward (same positions, same
    attention), so the loss and gradients match; the prefix's gradient is summed
    over rows by autograd. For chat data with a fixed system prompt this skips
    about a third of the tokens (Banking77: 12 of 36).

    With tunelab's attention and a prefix no longer than the rows' remainders, the
    prefix rides along in the same forward (`_body_with_prefix_in_batch`); otherwise it is
    run first, alone, into a KV cache that every row then reads. Models with a sliding
    window shorter than the rows also take that path: its masks are transformers' own.
    """
    p = batch.shared_prefix
    b, t = batch.input_ids.shape
    window = getattr(body.config, "sliding_window", None)
    if (getattr(body.config, "_attn_implementation", None) == attention.NAME and p <= t - p
            and (window is None or window >= t)):
        return _body_with_prefix_in_batch(body, batch)
    cache = DynamicCache(config=body.config)
    body(input_ids=batch.input_ids[:1, :p], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(b)  # (1, ...) -> (B, ...), differentiable
    if batch.segment_ids is not None:  # rows packed behind the prefix: each remainder sees the prefix and itself
        mask = prefix_block_mask(batch.segment_ids, p, body.get_input_embeddings().weight.dtype)  # (B, 1, T-P, T)
        positions = batch.position_ids[:, p:]  # (B, T-P)
    else:
        mask = batch.attention_mask  # (B, T)
        positions = torch.arange(p, t).expand(b, -1)  # (B, T-P)
    return body(
        input_ids=batch.input_ids[:, p:], attention_mask=mask, position_ids=positions,
        past_key_values=cache, use_cache=True,
    ).last_hidden_state


def _body_with_prefix_in_batch(body: torch.nn.Module, batch: Batch) -> torch.Tensor:
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


def reads_prefix_in_place(model: PreTrainedModel | PeftModel) -> bool:
    """Whether `attention.behind_shared_prefix` applies: our attention, on CPU (its flash kernel is the CPU one)."""
    return model.device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == attention.NAME


@torch.no_grad()
def shared_prefix_kv(model: PreTrainedModel | PeftModel, prefix: list[int], precision: Precision) -> PrefixKV:
    """Per layer, the (1, Hkv, P, D) keys and values of `prefix`: computed once, read in place by many rows."""
    body, _ = body_and_head(model)
    cache = DynamicCache(config=body.config)
    with precision.autocast():
        body(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def validation_sums(
    model: PreTrainedModel | PeftModel, batches: list[Batch], precision: Precision, prefix_kv: PrefixKV | None = None
) -> torch.Tensor:
    """(loss sum, correct next-token predictions, trained tokens) over the batches, as a float64 tensor.

    Sums, so that processes can add theirs (all_reduce) before dividing. `prefix_kv`: see `trained_logits`.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        with precision.autocast(), eager_layers(model):  # compiled layers: no second graph for a few batches
            logits, targets = trained_logits(model, batch, prefix_kv)
        sums += torch.tensor([
            float(F.cross_entropy(logits, targets, reduction="sum")),
            float((logits.argmax(-1) == targets).sum()),
            targets.numel(),
        ], dtype=torch.float64)
    model.train(was_training)
    return sums


def validation_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss per trained token and token accuracy (greedy next token == reference)."""
    loss, correct, count = sums.tolist()
    return {"val_loss": loss / max(count, 1), "val_token_accuracy": correct / max(count, 1)}


def validation_loss(model: PreTrainedModel | PeftModel, batches: list[Batch], precision: Precision) -> float:
    """Mean loss per trained token over the validation batches."""
    return validation_metrics(validation_sums(model, batches, precision))["val_loss"]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
    schedule: str = "cosine",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable parameters (fp32) with linear warmup, then cosine or linear decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "trainable parameters must be fp32"
    # fused: one kernel over every parameter instead of ~6 per parameter. For SmolLM2's 420 LoRA
    # tensors on this CPU: 21 -> 4 ms per step, the same update within 1 ulp. FSDP's shards are
    # DTensors, which the fused kernel does not take: they keep the default implementation.
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused or None)
    decay = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[schedule]
    return optimizer, decay(optimizer, warmup_steps, total_steps)
