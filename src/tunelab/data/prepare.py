"""records -> split -> tokenize: the data half of a run, with a report of what it did."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.records import Conversation, read_conversations
from tunelab.data.split import Split, split_conversations
from tunelab.data.tokenize import TokenizedExample, tokenize_conversations
from tunelab.errors import TunelabError
from tunelab.io import file_sha256

MIN_TRAIN_EXAMPLES = 1


@dataclass
class PreparedData:
    split: Split
    train_rows: list[Conversation]  # the (possibly capped) training conversations
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    report: dict[str, Any] = field(default_factory=dict)


def token_stats(lengths: list[int], trained: list[int]) -> dict[str, Any]:
    """Tokens and trained tokens per training example (the data report's numbers; DPO: per pair)."""
    return {
        "tokens_per_example": {"mean": statistics.fmean(lengths), "min": min(lengths), "max": max(lengths)},
        "trained_tokens_per_example": {"mean": statistics.fmean(trained), "min": min(trained), "max": max(trained)},
        "train_tokens": sum(lengths),
        "train_trained_tokens": sum(trained),
    }


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int) -> PreparedData:
    rows = read_conversations(cfg)
    split = split_conversations(rows, cfg.split)
    if not split.train:
        raise TunelabError(
            f"no training rows after the {cfg.split} split of {len(rows)} rows",
            fix="add more rows (at least 10 are needed for a useful split)",
            where=str(cfg.path),
        )
    train_rows = split.train[: cfg.max_train_rows] if cfg.max_train_rows else split.train
    train, dropped = tokenize_conversations(tokenizer, train_rows, cfg.max_length)
    validation, val_dropped = tokenize_conversations(tokenizer, split.validation[:val_rows], cfg.max_length)
    if len(train) < MIN_TRAIN_EXAMPLES:
        raise TunelabError(
            f"all {len(train_rows)} training examples are longer than data.max_length={cfg.max_length} tokens",
            fix="raise data.max_length or shorten the examples",
            where=str(cfg.path),
        )
    lengths = [len(e.input_ids) for e in train]
    trained = [e.trained_tokens for e in train]
    report = {
        "path": str(cfg.path),
        "sha256": file_sha256(Path(cfg.path)),
        "rows": len(rows),
        "splits": split.sizes(),
        "stratified": split.stratified,
        "labels": len({c.answer for c in rows}) if split.stratified else None,
        "train_rows_used": len(train),
        "dropped_too_long": {"count": len(dropped) + len(val_dropped), "first": (dropped + val_dropped)[:5]},
        "validation_rows_used": len(validation),
        **token_stats(lengths, trained),
    }
    return PreparedData(split, train_rows, train, validation, report)
