"""records -> split -> tokenize: the data half of a run, and a typed report of what it did.

    data = prepare_data(cfg.data, tokenizer, val_rows=200)               # supervised: conversations
    data = prepare_preference_data(cfg.data, tokenizer, val_rows=200)    # DPO: preference pairs
    data.train, data.validation                                          # tokenized, ready to batch
    data.report.tokens_per_example.mean                                  # DataReport (data.json keeps it)

Either reads `cfg.path`, or `records` passed in memory (`tunelab.train(cfg, records=[...])`).
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from tunelab.config import DataConfig
from tunelab.data.pairs import TokenizedPair, tokenize_pairs
from tunelab.data.read import IN_MEMORY, Records, read_conversations, read_preference_pairs, records_bytes
from tunelab.data.records import Conversation, PreferencePair
from tunelab.data.report import DataReport, Dropped, TokenStats
from tunelab.data.split import Split, split_conversations
from tunelab.data.tokenize import TokenizedExample, tokenize_conversations
from tunelab.errors import TunelabError
from tunelab.io import file_sha256

PREFERENCE_FORMATS = ("dpo", "chosen_rejected")


@dataclass
class PreparedData:
    split: Split
    train_rows: list[Conversation]  # the (possibly capped) training conversations
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    report: DataReport

    @property
    def test_rows(self) -> list[Conversation]:
        return self.split.test

    def held_out(self) -> tuple[list[Conversation], list[Conversation]]:
        """(test rows, every training row): what evaluation compares on and draws few-shot examples from."""
        return self.split.test, self.split.train


@dataclass
class PreparedPairs:
    train_rows: list[PreferencePair]  # the (possibly capped) training pairs, hash order
    validation_rows: list[PreferencePair]
    test_rows: list[PreferencePair]
    train: list[TokenizedPair]
    validation: list[TokenizedPair]
    report: DataReport

    def held_out(self) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """(test pairs, training pairs)."""
        return self.test_rows, self.train_rows


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int,
                 records: Records | None = None) -> PreparedData:
    """Conversations -> split -> tokenize (rows longer than `cfg.max_length` dropped and counted)."""
    rows = read_conversations(cfg, records)
    split = split_conversations(rows, cfg.split)
    _require_train(split.train, len(rows), "rows", cfg, records)
    train_rows = split.train[: cfg.max_train_rows] if cfg.max_train_rows else split.train
    train, dropped = tokenize_conversations(tokenizer, train_rows, cfg.max_length)
    validation, val_dropped = tokenize_conversations(tokenizer, split.validation[:val_rows], cfg.max_length)
    _require_tokens(train, len(train_rows), "training examples are", cfg, records)
    report = _report(cfg, records, "sft", len(rows), split.sizes(), split.stratified,
                     len({c.answer for c in rows}) if split.stratified else None, dropped + val_dropped,
                     [len(e.input_ids) for e in train], [e.trained_tokens for e in train], len(validation))
    return PreparedData(split, train_rows, train, validation, report)


def prepare_preference_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, val_rows: int,
                            records: Records | None = None) -> PreparedPairs:
    """Pairs -> split -> tokenize, the preference twin of `prepare_data`; a pair is dropped whole when
    either row is too long, and `tokens_per_example` is what one pair (both rows) adds to a micro-batch."""
    if cfg.format not in (*PREFERENCE_FORMATS, "auto"):
        raise TunelabError(
            f"data.format is '{cfg.format}', but objective dpo needs preference pairs",
            fix="set data.format to dpo (input / preferred_output / non_preferred_output) or chosen_rejected "
            f"(prompt / chosen / rejected), or auto; `tunelab data validate {cfg.path}` shows what the file holds",
            where=_name(cfg, records),
        )
    pairs = read_preference_pairs(cfg, records)  # raises when the data holds conversations
    train_rows, val_all, test_rows = split_pairs(pairs, cfg.split)
    sizes = {"train": len(train_rows), "validation": len(val_all), "test": len(test_rows)}
    _require_train(train_rows, len(pairs), "pairs", cfg, records)
    train_rows = train_rows[: cfg.max_train_rows] if cfg.max_train_rows else train_rows
    train, dropped = tokenize_pairs(tokenizer, train_rows, cfg.max_length)
    validation, val_dropped = tokenize_pairs(tokenizer, val_all[:val_rows], cfg.max_length)
    _require_tokens(train, len(train_rows), "training pairs have a row", cfg, records)
    report = _report(cfg, records, "dpo", len(pairs), sizes, False, None, dropped + val_dropped,
                     [p.input_tokens for p in train], [p.trained_tokens for p in train], len(validation))
    return PreparedPairs(train_rows, val_all, test_rows, train, validation, report)


def split_pairs(pairs: list[PreferencePair], fractions: tuple[float, float, float]
                ) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(train, validation, test) pairs, by the same content hash as conversations (data/split.py).

    Each pair is keyed on its prompt + chosen + rejected messages: `split_conversations` hashes the
    messages of what it is given, so it gets one key-carrying Conversation per pair (source = its index).
    """
    keys = [Conversation(p.prompt + p.chosen + p.rejected, str(i)) for i, p in enumerate(pairs)]
    split = split_conversations(keys, fractions)
    train, validation, test = ([pairs[int(k.source)] for k in part] for part in (split.train, split.validation, split.test))
    return train, validation, test


def _report(cfg: DataConfig, records: Records | None, objective: Literal["sft", "dpo"], rows: int,
            splits: dict[str, int], stratified: bool, labels: int | None, dropped: list[str], lengths: list[int],
            trained: list[int], validation_rows_used: int) -> DataReport:
    sha = (hashlib.sha256(records_bytes(records)).hexdigest() if records is not None
           else file_sha256(cfg.path))
    return DataReport(
        path=_name(cfg, records), sha256=sha, objective=objective, rows=rows, splits=splits, stratified=stratified,
        labels=labels, train_rows_used=len(lengths), dropped_too_long=Dropped(count=len(dropped), first=dropped[:5]),
        validation_rows_used=validation_rows_used,
        tokens_per_example=TokenStats(mean=statistics.fmean(lengths), min=min(lengths), max=max(lengths)),
        trained_tokens_per_example=TokenStats(mean=statistics.fmean(trained), min=min(trained), max=max(trained)),
        train_tokens=sum(lengths), train_trained_tokens=sum(trained),
    )


def _name(cfg: DataConfig, records: Records | None) -> str:
    return str(IN_MEMORY if records is not None else cfg.path)


def _require_train(train: list, total: int, noun: str, cfg: DataConfig, records: Records | None) -> None:
    if not train:
        raise TunelabError(f"no training {noun} after the {cfg.split} split of {total} {noun}",
                           fix=f"add more {noun} (at least 10 are needed for a useful split)",
                           where=_name(cfg, records))


def _require_tokens(train: list, total: int, what: str, cfg: DataConfig, records: Records | None) -> None:
    if not train:
        raise TunelabError(f"all {total} {what} longer than data.max_length={cfg.max_length} tokens",
                           fix="raise data.max_length or shorten the examples", where=_name(cfg, records))
