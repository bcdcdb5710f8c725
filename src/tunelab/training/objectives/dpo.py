r"""Direct preference optimisation (DPO): the loss over preference pairs, for the shared training loop.

Used when `objective: dpo`. Data are preference pairs (format `dpo` or `chosen_rejected`; see
`data/pairs.py` for how a pair becomes two token rows): a prompt, a chosen answer and a rejected
one. The loss (Rafailov et al. 2023) raises the chosen answer's log-probability relative to the
reference model more than the rejected one's:

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    pc, pr   sum of log p(token) over the chosen / rejected completion (+ end-of-turn), adapter on (the policy)
    rc, rr   the same with the adapter off (the reference: the base, frozen; no second copy)

so a LoRA run needs no second model in memory. `beta * (pc - rc)` is the chosen answer's
implicit reward; the reward margin (chosen minus rejected) is positive when the policy
prefers the chosen answer more than the base does; at initialisation (LoRA B = 0) every
margin is 0 and every loss log 2 = 0.693.

Accumulation and validation mirror SFT: `dpo_loss_sum` returns a SUM over pairs, the step
divides by the pairs of the whole optimizer step (see `DpoStats`, which also sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import DataConfig, EvalConfig
from tunelab.data.batches import Batch
from tunelab.data.pairs import PairBatch, TokenizedPair, collate_pairs
from tunelab.data.prepare import PreparedPairs, prepare_preference_data, split_pairs
from tunelab.data.read import Records, read_preference_pairs
from tunelab.data.records import PreferencePair
from tunelab.errors import TunelabError
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.result import EvalResult
from tunelab.model.precision import Precision
from tunelab.model.scoring import sequence_logprobs


def require_adapter(model: torch.nn.Module) -> PeftModel:
    """DPO's reference is the base, read by switching the adapter off: a model without one cannot do that."""
    if not isinstance(model, PeftModel):
        raise TunelabError(
            "objective dpo needs a LoRA adapter: its reference model is the same weights with the adapter "
            "switched off; full fine-tuning would need a second, frozen copy of the model in memory",
            fix="set tuning: lora (the default) with objective: dpo",
        )
    return model


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

    def __add__(self, other: DpoStats) -> DpoStats:
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


@dataclass(frozen=True)
class Dpo:
    beta: float = 0.1  # dpo.beta: the pull towards the reference (the base)
    share_prefix: bool = True  # the pair's shared prompt computed once (off under kernels: reference)
    name: str = "dpo"
    unit: str = "pair"

    def describe(self) -> str:
        return f"DPO beta {self.beta:g}, reference = the base (adapter off)"

    def prepare(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int,
                records: Records | None = None) -> PreparedPairs:
        return prepare_preference_data(cfg, tokenizer, val_rows, records)

    def check_model(self, model: torch.nn.Module) -> PeftModel:
        return require_adapter(model)

    def collate(self, examples: list[TokenizedPair], pad_id: int) -> PairBatch:
        return collate_pairs(examples, pad_id, share_prefix=self.share_prefix)

    def collate_validation(self, examples: list[TokenizedPair], pad_id: int) -> PairBatch:
        return collate_pairs(examples, pad_id, share_prefix=self.share_prefix)

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, stats = dpo_loss_sum(model, batch, self.beta)
        return loss_sum, {"reward_margin": stats.margin, "reward_accuracy": stats.correct,
                          "chosen_reward": stats.chosen_reward, "rejected_reward": stats.rejected_reward}

    @torch.no_grad()
    def validation_sums(self, model: torch.nn.Module, batches: list[PairBatch], precision: Precision) -> torch.Tensor:
        """(pairs, loss sum, margin sum, pairs with margin > 0), in eval mode."""
        was_training = model.training
        model.eval()
        total = DpoStats()
        try:
            for pair_batch in batches:
                with precision.autocast():
                    _, stats = dpo_loss_sum(model, pair_batch, self.beta)
                total = total + stats
        finally:
            model.train(was_training)
        return torch.tensor([total.pairs, total.loss, total.margin, total.correct], dtype=torch.float64)

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        pairs, loss, margin, correct = sums.tolist()
        n = max(pairs, 1)
        return {"val_loss": loss / n, "val_reward_margin": margin / n, "val_reward_accuracy": correct / n}

    def describe_validation(self, record: dict[str, float]) -> str:
        return (f"validation loss {record['val_loss']:.4f}, reward margin {record['val_reward_margin']:.3f}, "
                f"reward accuracy {record['val_reward_accuracy']:.1%}")

    def held_out(self, cfg: DataConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
        train, _, test = split_pairs(read_preference_pairs(cfg), cfg.split)
        return test, train

    def read(self, cfg: DataConfig) -> list[PreferencePair]:
        return read_preference_pairs(cfg)

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test_rows: list[PreferencePair],
                 train_rows: list[PreferencePair], cfg: EvalConfig, precision: Precision,
                 base_model: PreTrainedModel | None = None, reuse: BaseResults | None = None) -> EvalResult:
        from tunelab.evaluation.preference import evaluate_preferences

        return evaluate_preferences(require_adapter(model), tokenizer, test_rows, cfg, precision)
