"""What a training objective is: the one interface SFT and DPO implement, and the recipe calls.

Everything that differs between objectives lives behind it, so the recipe (`training/recipe.py`),
the setup and the plan hold no `if objective == ...`; adding one (KTO, ORPO) means one new module.

    objective = objective_for(cfg, shard=False)       # training/objectives/__init__.py: the one choice
    data = objective.prepare(cfg.data, tokenizer, val_rows, records)
    batch = objective.collate(data.train[:16], pad_id)
    loss_sum, stats = objective.loss(model, batch)     # a SUM: the step divides by its loss units
    sums = objective.validation_sums(model, batches, precision)   # summable over processes
    objective.validation_metrics(sums)                 # {"val_loss", ...}
    test, train = objective.held_out(cfg.data)        # the held-out rows, read and split again (no tokenizing)
    objective.evaluate(model, tokenizer, test, train, cfg.eval, precision)   # -> EvalResult
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.config import DataConfig, EvalConfig
    from tunelab.data.read import Records
    from tunelab.evaluation.base_results import BaseResults
    from tunelab.evaluation.result import EvalResult
    from tunelab.model.precision import Precision


class Objective(Protocol):
    name: str  # as in the config: "sft" | "dpo"
    unit: str  # what one training example is, for the plan and the log: "example" | "pair"

    def describe(self) -> str:
        """One phrase for the run log, e.g. 'DPO beta 0.1, reference = the base (adapter off)'."""

    def prepare(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int,
                records: Records | None = None) -> Any:
        """Read, split and tokenize: an object with `train`, `validation` (tokenized), `test_rows`, `report`."""

    def check_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model, or a TunelabError when this objective cannot train it."""

    def collate(self, examples: list, pad_id: int) -> Any:
        """A training micro-batch's tensors (with `real_tokens`, `trained_tokens`, `loss_units`)."""

    def collate_validation(self, examples: list, pad_id: int) -> Any:
        """A validation batch (never packed)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss SUM over the batch's loss units, statistics summed likewise)."""

    def validation_sums(self, model: torch.nn.Module, batches: list, precision: Precision) -> torch.Tensor:
        """float64 sums over `batches` that processes add up (all_reduce) before `validation_metrics`."""

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """Means from summed `validation_sums`: {"val_loss", ...}."""

    def describe_validation(self, record: dict[str, float]) -> str:
        """A validation record in words, for the run log."""

    def held_out(self, cfg: DataConfig) -> tuple[list, list]:
        """(test rows, training rows) of the data, split as training split it: what evaluation compares on."""

    def read(self, cfg: DataConfig) -> list:
        """Every row of `cfg.path` as this objective's records (to evaluate on a file of its own)."""

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test_rows: list, train_rows: list,
                 cfg: EvalConfig, precision: Precision, base_model: PreTrainedModel | None = None,
                 reuse: BaseResults | None = None) -> EvalResult:
        """The fine-tune against the base on `test_rows` (`train_rows`: where few-shot examples come from;
        `base_model`: when the base is not the fine-tune with its adapter off, i.e. after full fine-tuning;
        `reuse`: where the base's results of an earlier evaluation are read back, evaluation/base_results.py)."""
