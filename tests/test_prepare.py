"""tunelab.data.prepare: records -> split -> tokenize, and the data report."""

from __future__ import annotations

import hashlib

import pytest

from tunelab.config import DataConfig
from tunelab.data.prepare import prepare_data
from tunelab.data.split import split_conversations
from tunelab.data.records import read_conversations
from tunelab.errors import TunelabError


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=path, format="csv", input_column="text", output_column="label", **kw)


def test_report_and_examples(classification_csv, tiny_tokenizer):
    data = prepare_data(cfg(classification_csv, system_prompt="Classify the intent."), tiny_tokenizer, val_rows=3)
    rep = data.report
    assert rep["rows"] == 75 and rep["stratified"] is True and rep["labels"] == 5
    assert rep["splits"] == data.split.sizes() and sum(rep["splits"].values()) == 75
    assert rep["train_rows_used"] == len(data.train) == len(data.split.train)
    assert rep["validation_rows_used"] == len(data.validation) == 3
    assert rep["dropped_too_long"] == {"count": 0, "first": []}
    assert rep["sha256"] == hashlib.sha256(classification_csv.read_bytes()).hexdigest()
    assert rep["train_tokens"] == sum(len(e.input_ids) for e in data.train)
    assert rep["train_trained_tokens"] == sum(e.trained_tokens for e in data.train)
    assert rep["tokens_per_example"]["min"] <= rep["tokens_per_example"]["mean"] <= rep["tokens_per_example"]["max"]
    assert [e.source for e in data.train] == [c.source for c in data.split.train]
    assert all(c.messages[0].content == "Classify the intent." for c in data.train_rows)


def test_max_train_rows_takes_a_fixed_hash_ordered_subset(classification_csv, tiny_tokenizer):
    data = prepare_data(cfg(classification_csv, max_train_rows=10), tiny_tokenizer, val_rows=2)
    assert len(data.train) == len(data.train_rows) == 10
    full = split_conversations(read_conversations(cfg(classification_csv)))
    assert data.train_rows == full.train[:10]
    # hash order, not file order: the 5 labels are sorted in the file, the subset mixes them
    assert len({c.answer for c in data.train_rows}) >= 3


def test_too_long_rows_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    from conftest import classification_rows, write_csv

    rows = classification_rows() + [("the quick brown fox jumps over the lazy dog " * 6, "refund")]
    path = write_csv(tmp_path / "d.csv", rows)
    data = prepare_data(cfg(path, max_length=60), tiny_tokenizer, val_rows=100)
    assert data.report["dropped_too_long"]["count"] == 1
    assert data.report["dropped_too_long"]["first"] == [f"{path}:77"]
    assert all(len(e.input_ids) <= 60 for e in data.train + data.validation)

    with pytest.raises(TunelabError, match="longer than data.max_length=8"):
        prepare_data(cfg(path, max_length=8), tiny_tokenizer, val_rows=2)


def test_val_rows_zero_means_no_validation(classification_csv, tiny_tokenizer):
    data = prepare_data(cfg(classification_csv), tiny_tokenizer, val_rows=0)
    assert data.validation == [] and data.report["validation_rows_used"] == 0
    assert len(data.train) == data.report["splits"]["train"]
