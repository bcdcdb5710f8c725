"""Supervised fine-tuning: cross-entropy on the assistant's tokens (and their end-of-turn), nothing else.

    batch = collate(examples)            # padded rows, or packed rows (train.packing), same examples
    loss_sum, n = token_loss_sum(model, batch)       # summed over trained tokens (model/scoring.py)

The LM head runs only where a token is trained. Validation reports the mean loss per trained
token and the token accuracy; the held-out evaluation generates an answer per test row for the
fine-tune, the base zero-shot and the base few-shot (evaluation/contenders.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import DataConfig, EvalConfig
from tunelab.data.batches import Batch, collate
from tunelab.data.pack import collate_packed
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.read import Records, read_conversations
from tunelab.data.records import Conversation
from tunelab.data.split import split_conversations
from tunelab.data.tokenize import TokenizedExample
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.result import EvalResult
from tunelab.model.precision import Precision
from tunelab.model.scoring import token_loss_sum, validation_metrics, validation_sums


@dataclass(frozen=True)
class Sft:
    packing: bool = False  # several examples per row (train.packing)
    pack_length: int | None = None
    fast: bool = True  # model.kernels: tunelab (a shared prefix computed once; the head and the loss in row chunks)
    sharded: bool = False  # FSDP: no shared-prefix pass in training steps (see `objective_for`)
    name: str = "sft"
    unit: str = "example"

    def describe(self) -> str:
        return "SFT: loss on the assistant's answers and their end-of-turn tokens"

    def prepare(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int,
                records: Records | None = None) -> PreparedData:
        return prepare_data(cfg, tokenizer, val_rows, records)

    def check_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def collate(self, examples: list[TokenizedExample], pad_id: int) -> Batch:
        share = self.fast and not self.sharded
        if self.packing:
            return collate_packed(examples, pad_id, self.pack_length, share_prefix=share)
        return collate(examples, pad_id, share_prefix=share)

    def collate_validation(self, examples: list[TokenizedExample], pad_id: int) -> Batch:
        return collate(examples, pad_id, share_prefix=self.fast)  # no gradients: the prefix pass is safe under FSDP

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, _ = token_loss_sum(model, batch, fused_head=self.fast)
        return loss_sum, {}

    def validation_sums(self, model: torch.nn.Module, batches: list[Batch], precision: Precision) -> torch.Tensor:
        return validation_sums(model, batches, precision)

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return validation_metrics(sums)

    def describe_validation(self, record: dict[str, float]) -> str:
        return f"validation loss {record['val_loss']:.4f}, token accuracy {record['val_token_accuracy']:.1%}"

    def held_out(self, cfg: DataConfig) -> tuple[list[Conversation], list[Conversation]]:
        split = split_conversations(read_conversations(cfg), cfg.split)
        return split.test, split.train

    def read(self, cfg: DataConfig) -> list[Conversation]:
        return read_conversations(cfg)

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test_rows: list[Conversation],
                 train_rows: list[Conversation], cfg: EvalConfig, precision: Precision,
                 base_model: PreTrainedModel | None = None, reuse: BaseResults | None = None) -> EvalResult:
        from tunelab.evaluation.contenders import evaluate_run

        if not test_rows:
            return EvalResult(task=None, metric=None, test_rows=0)
        return evaluate_run(model, tokenizer, test_rows, train_rows, cfg, precision, base_model=base_model,
                            reuse=reuse)
