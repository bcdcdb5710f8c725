r"""Direct preference optimisation (DPO): setup and loss for the shared training loop.

Used when `objective: dpo`. Data are preference pairs (format `dpo` or `chosen_rejected`):
a prompt, a chosen answer and a rejected one. The loss (Rafailov et al. 2023) raises the
chosen answer's log-probability relative to the reference model more than the rejected one's:

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    pc, pr   sum of log p(token) over the chosen / rejected completion, adapter on (the policy)
    rc, rr   the same with the adapter off (the reference: the base, frozen; no second copy)

so a LoRA run needs no second model in memory. `beta * (pc - rc)` is the chosen answer's
implicit reward; the reward margin (chosen minus rejected) is positive when the policy
prefers the chosen answer more than the base does; at initialisation (LoRA B = 0) every
margin is 0 and every loss log 2 = 0.693.

Worked example (ChatML, as SmolLM2's template; tokens as the tiny test tokenizer splits them):

    pair:  prompt (user: "2+2?")   chosen (assistant: "4")   rejected (assistant: "5")

    chosen row   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>
    rejected row <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>

    tokens (end)  ...  <|im_start|>   as   sistant   \n     4 | 5   <|im_end|>
    labels (end)  ...      -100      -100   -100    -100    4 | 5   <|im_end|>      (39 tokens, 2 scored)

Only the completion and its end-of-turn token are scored: pc = log p("4") + log p(<|im_end|>),
pr = log p("5") + log p(<|im_end|>). Assistant turns inside the prompt are context (weight 0):
DPO compares the completions, not the conversation that led to them. A batch of B pairs is
one `Batch` of 2B rows, chosen rows first, so one forward serves both sides; the rows share
the prompt, so the shared-prefix pass of `loop.py` often applies too.

Accumulation and validation mirror SFT: `dpo_loss_sum` returns a SUM over pairs, the caller
divides by the pairs of the whole optimizer step (see `DpoStats`, which also sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.batches import Batch, collate
from tunelab.data.prepare import token_stats
from tunelab.data.records import Conversation, Message, PreferencePair, read_preference_pairs
from tunelab.data.split import split_conversations
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_conversations
from tunelab.errors import TunelabError
from tunelab.io import file_sha256
from tunelab.train.loop import Precision, trained_logits

PREFERENCE_FORMATS = ("dpo", "chosen_rejected")
_UNLIMITED = 1 << 62  # tokenize without dropping: pairs are dropped here, as a whole


# ---------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    chosen: TokenizedExample  # labels only on the chosen completion (+ end-of-turn)
    rejected: TokenizedExample  # labels only on the rejected completion (+ end-of-turn)
    source: str  # "file:line"

    @property
    def length(self) -> int:
        """Tokens of the longer row: the padded width this pair needs (for length grouping)."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    @property
    def input_tokens(self) -> int:
        """Real input tokens of both rows: a pair goes through the model twice (as `PairBatch.real_tokens`)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PreparedPairs:
    train_rows: list[PreferencePair]  # the (possibly capped) training pairs, hash order
    validation_rows: list[PreferencePair]
    test_rows: list[PreferencePair]
    train: list[TokenizedPair]
    validation: list[TokenizedPair]
    report: dict[str, Any] = field(default_factory=dict)


def scored_conversation(pair: PreferencePair, completion: tuple[Message, ...]) -> Conversation:
    """prompt + completion, with only the completion's assistant messages trained (weight 1)."""
    context = tuple(replace(m, weight=0) if m.role == "assistant" else m for m in pair.prompt)
    answer = tuple(replace(m, weight=1) if m.role == "assistant" else m for m in completion)
    return Conversation(context + answer, pair.source)


def prepare_preference_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int) -> PreparedPairs:
    """Pairs -> split -> tokenize, and the data report; the preference twin of `prepare_data`.

    The report keeps `prepare_data`'s keys; an "example" there is a pair (both rows), so
    `tokens_per_example` is what one pair adds to a micro-batch.
    """
    if cfg.format not in (*PREFERENCE_FORMATS, "auto"):
        raise TunelabError(
            f"data.format is '{cfg.format}', but objective dpo needs preference pairs",
            fix="set data.format to dpo (input / preferred_output / non_preferred_output) or chosen_rejected "
            f"(prompt / chosen / rejected); `tunelab data validate {cfg.path}` shows what the file holds",
            where=str(cfg.path),
        )
    pairs = read_preference_pairs(cfg)  # raises when the file holds conversations
    # The split keys each pair on its prompt + chosen + rejected messages: split_conversations hashes the
    # messages of what it is given, so hand it one key-carrying Conversation per pair (source = its index).
    keys = [Conversation(p.prompt + p.chosen + p.rejected, str(i)) for i, p in enumerate(pairs)]
    split = split_conversations(keys, cfg.split)
    train_rows, val_all, test_rows = ([pairs[int(k.source)] for k in part] for part in
                                      (split.train, split.validation, split.test))
    if not train_rows:
        raise TunelabError(
            f"no training pairs after the {cfg.split} split of {len(pairs)} pairs",
            fix="add more pairs (at least 10 are needed for a useful split)", where=str(cfg.path),
        )
    train_rows = train_rows[: cfg.max_train_rows] if cfg.max_train_rows else train_rows
    train, dropped = _tokenize_pairs(tokenizer, train_rows, cfg.max_length)
    validation, val_dropped = _tokenize_pairs(tokenizer, val_all[:val_rows], cfg.max_length)
    if not train:
        raise TunelabError(
            f"all {len(train_rows)} training pairs have a row longer than data.max_length={cfg.max_length} tokens",
            fix="raise data.max_length or shorten the examples", where=str(cfg.path),
        )
    lengths = [p.input_tokens for p in train]  # per pair: both rows
    trained = [p.trained_tokens for p in train]
    report = {
        "path": str(cfg.path),
        "sha256": file_sha256(Path(cfg.path)),
        "objective": "dpo",
        "rows": len(pairs),
        "splits": {"train": len(split.train), "validation": len(val_all), "test": len(test_rows)},
        "stratified": False,  # pairs have no label to stratify by
        "labels": None,
        "train_rows_used": len(train),
        "dropped_too_long": {"count": len(dropped) + len(val_dropped), "first": (dropped + val_dropped)[:5]},
        "validation_rows_used": len(validation),
        **token_stats(lengths, trained),
    }
    return PreparedPairs(train_rows, val_all, test_rows, train, validation, report)


def _tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], max_length: int
) -> tuple[list[TokenizedPair], list[str]]:
    """Tokenize both sides (two batched calls); a pair is dropped when either row is longer than max_length."""
    chosen, _ = tokenize_conversations(tokenizer, [scored_conversation(p, p.chosen) for p in pairs], _UNLIMITED)
    rejected, _ = tokenize_conversations(tokenizer, [scored_conversation(p, p.rejected) for p in pairs], _UNLIMITED)
    kept: list[TokenizedPair] = []
    dropped: list[str] = []
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        if max(len(c.input_ids), len(r.input_ids)) > max_length:
            dropped.append(pair.source)
        else:
            kept.append(TokenizedPair(c, r, pair.source))
    return kept, dropped


@dataclass
class PairBatch:
    batch: Batch  # 2B rows: rows [0, B) the chosen answers, rows [B, 2B) the rejected ones, same order
    pairs: int  # B

    @property
    def real_tokens(self) -> int:
        return self.batch.real_tokens

    @property
    def trained_tokens(self) -> int:
        return self.batch.trained_tokens

    @property
    def loss_units(self) -> int:
        """DPO's loss is a sum over pairs, divided by the pairs of the whole step."""
        return self.pairs


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
    """B pairs -> one right-padded Batch of 2B rows (chosen first), so one forward serves both sides."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return PairBatch(collate(rows, pad_id), len(pairs))


# ---------------------------------------------------------------- loss


def require_adapter(model: PreTrainedModel | PeftModel) -> PeftModel:
    """DPO's reference is the base, read by switching the adapter off: a model without one cannot do that."""
    if not isinstance(model, PeftModel):
        raise TunelabError(
            "objective dpo needs a LoRA adapter: its reference model is the same weights with the adapter "
            "switched off; full fine-tuning would need a second, frozen copy of the model in memory",
            fix="set tuning: lora (the default) with objective: dpo",
        )
    return model


def sequence_logprobs(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """(rows,) sum of log p(token) over each row's trained tokens, LM head at trained positions only."""
    assert batch.position_ids is None, "pair batches are padded, never packed"
    logits, targets = trained_logits(model, batch)  # (N, vocab) fp32, (N,): N = trained tokens of all rows
    token_logp = -F.cross_entropy(logits, targets, reduction="none")  # (N,): the SFT loss, per token
    keep = batch.labels[:, batch.shared_prefix + 1 :] != IGNORE_INDEX  # (R, T-P-1): the mask trained_logits used
    row_of = keep.nonzero()[:, 0]  # (N,): boolean indexing and nonzero both walk the rows in order
    assert row_of.numel() == targets.numel()
    return torch.zeros(keep.shape[0], dtype=token_logp.dtype, device=token_logp.device).index_add(0, row_of, token_logp)


@torch.no_grad()
def reference_logprobs(model: PeftModel, batch: Batch) -> torch.Tensor:
    """(rows,) `sequence_logprobs` of the base: the same weights with the adapter off, no gradient."""
    with require_adapter(model).disable_adapter():
        return sequence_logprobs(model, batch)


@dataclass
class DpoStats:
    """Sums over pairs, so micro-batches add up; `mean()` divides by the pairs."""

    loss: float = 0.0
    chosen_reward: float = 0.0  # beta * (pc - rc)
    rejected_reward: float = 0.0  # beta * (pr - rr)
    margin: float = 0.0  # chosen_reward - rejected_reward
    correct: int = 0  # pairs with margin > 0
    pairs: int = 0

    def __add__(self, other: "DpoStats") -> "DpoStats":
        return DpoStats(self.loss + other.loss, self.chosen_reward + other.chosen_reward,
                        self.rejected_reward + other.rejected_reward, self.margin + other.margin,
                        self.correct + other.correct, self.pairs + other.pairs)

    def mean(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {"loss": self.loss / n, "reward_margin": self.margin / n, "reward_accuracy": self.correct / n,
                "chosen_reward": self.chosen_reward / n, "rejected_reward": self.rejected_reward / n}


def dpo_loss_sum(model: PeftModel, pair_batch: PairBatch, beta: float) -> tuple[torch.Tensor, DpoStats]:
    """Sum over the B pairs of -log sigmoid(beta * ((pc - rc) - (pr - rr))), and its statistics.

    A sum, like `token_loss_sum`: divide by the pairs of the whole optimizer step, so
    accumulating micro-batches gives the gradient of one big batch.
    """
    b = pair_batch.pairs
    ref = reference_logprobs(model, pair_batch.batch)  # (2B,), first: its activations are freed before the policy's
    policy = sequence_logprobs(model, pair_batch.batch)  # (2B,), with the graph for backward
    chosen_reward = beta * (policy[:b] - ref[:b])  # (B,)
    rejected_reward = beta * (policy[b:] - ref[b:])  # (B,)
    margin = chosen_reward - rejected_reward  # (B,): beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(margin)  # (B,)
    stats = DpoStats(float(losses.detach().sum()), float(chosen_reward.detach().sum()),
                     float(rejected_reward.detach().sum()), float(margin.detach().sum()),
                     int((margin.detach() > 0).sum()), b)
    return losses.sum(), stats


@torch.no_grad()
def dpo_validation(model: PeftModel, batches: list[PairBatch], beta: float, precision: Precision) -> dict[str, float]:
    """Mean loss, reward margin and accuracy (and mean rewards) over the validation pairs, in eval mode."""
    was_training = model.training
    model.eval()
    total = DpoStats()
    try:
        for pair_batch in batches:
            with precision.autocast():
                _, stats = dpo_loss_sum(model, pair_batch, beta)
            total = total + stats
    finally:
        model.train(was_training)
    return total.mean()
