"""What a model assigns to the trained tokens of a batch: the training loss, validation, evaluation scores.

The LM head runs only at positions that predict a trained token. With prompt-heavy chat data
(Banking77: ~5 trained of ~40 tokens) that skips most of the (tokens x vocab) logits and their
backward pass, and it is the same loss: positions with label -100 contribute nothing either way.

    loss_sum, n = token_loss_sum(model, batch)      # training: a sum, divided by the step's trained tokens
    logp = sequence_logprobs(model, batch)          # (rows,): DPO's policy and reference, preference evaluation
    sums = validation_sums(model, batches, p)       # (loss sum, right next tokens, tokens): processes add them
    validation_metrics(sums)                        # {"val_loss", "val_token_accuracy"}

Every function takes the batch's shared prefix into account (`kernels.prefix.body_hidden`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel

from tunelab.data.batches import Batch
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.model.kernels.compiled import eager_layers
from tunelab.model.kernels.head_loss import fused_head_loss
from tunelab.model.kernels.prefix import PrefixKV, body_hidden
from tunelab.model.load import body_and_head
from tunelab.model.precision import Precision

Model = PreTrainedModel | PeftModel


def trained_hidden(
    model: Model, batch: Batch, prefix_kv: PrefixKV | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The last hidden states at the positions that predict a trained token (N, hidden), those tokens (N,),
    and the LM head that maps the one to logits. `prefix_kv`: see `kernels.prefix.body_hidden`."""
    body, head = body_and_head(model)
    hidden = body_hidden(body, batch, prefix_kv)  # (B, T-P, H)
    targets = batch.labels[:, batch.shared_prefix + 1 :]  # (B, T-P-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-P-1)
    return hidden[:, :-1][keep], targets[keep], head  # (N, hidden), (N,): N = trained tokens only


def trained_logits(model: Model, batch: Batch, prefix_kv: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a trained token (N, vocab) in fp32, and those tokens (N,)."""
    hidden, targets, head = trained_hidden(model, batch, prefix_kv)
    return head(hidden).float(), targets


def token_loss_sum(model: Model, batch: Batch, fused_head: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over trained positions, and how many there were.

    Returning a sum (not a mean) lets the caller divide by the trained tokens of the
    whole accumulated batch, so 1 x 4 accumulation equals a batch of 4 exactly.
    `fused_head`: the head and the loss in row chunks (`kernels.head_loss`), where the head allows it.
    """
    hidden, targets, head = trained_hidden(model, batch)
    loss = fused_head_loss(hidden, head, targets) if fused_head else None
    if loss is None:  # a head that is not a plain linear layer (quantized, adapted), or the reference path
        loss = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return loss, int(targets.numel())


def sequence_logprobs(model: Model, batch: Batch) -> torch.Tensor:
    """(rows,) sum of log p(token) over each row's trained tokens, LM head at trained positions only."""
    if batch.position_ids is not None:
        raise ValueError("sequence_logprobs scores padded rows, one sequence per row; this batch is packed")
    logits, targets = trained_logits(model, batch)  # (N, vocab) fp32, (N,): N = trained tokens of all rows
    token_logp = -F.cross_entropy(logits, targets, reduction="none")  # (N,): the SFT loss, per token
    keep = batch.labels[:, batch.shared_prefix + 1 :] != IGNORE_INDEX  # (R, T-P-1): the mask trained_hidden used
    row_of = keep.nonzero()[:, 0]  # (N,): boolean indexing and nonzero both walk the rows in order
    return torch.zeros(keep.shape[0], dtype=token_logp.dtype, device=token_logp.device).index_add(0, row_of, token_logp)


@torch.no_grad()
def validation_sums(model: Model, batches: list[Batch], precision: Precision,
                    prefix_kv: PrefixKV | None = None) -> torch.Tensor:
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


def validation_loss(model: Model, batches: list[Batch], precision: Precision) -> float:
    """Mean loss per trained token over the validation batches."""
    return validation_metrics(validation_sums(model, batches, precision))["val_loss"]
