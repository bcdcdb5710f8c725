"""tunelab.data.prepare: records (or preference pairs) -> split -> tokenize, and the typed data report."""

from __future__ import annotations

import hashlib

import pytest

from helpers import chosen_rejected_rows, dpo_rows, many_pairs, write_jsonl
from tunelab.config import DataConfig
from tunelab.data.prepare import prepare_data, prepare_preference_data
from tunelab.data.read import read_conversations
from tunelab.data.split import split_conversations
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import TunelabError


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=path, format="csv", input_column="text", output_column="label", **kw)


def test_report_and_examples(classification_csv, tiny_tokenizer):
    data = prepare_data(cfg(classification_csv, system_prompt="Classify the intent."), tiny_tokenizer, val_rows=3)
    rep = data.report
    assert rep.rows == 75 and rep.stratified is True and rep.labels == 5 and rep.objective == "sft"
    assert rep.splits == data.split.sizes() and sum(rep.splits.values()) == 75
    assert rep.train_rows_used == len(data.train) == len(data.split.train)
    assert rep.validation_rows_used == len(data.validation) == 3
    assert rep.dropped_too_long.count == 0 and rep.dropped_too_long.first == []
    assert rep.sha256 == hashlib.sha256(classification_csv.read_bytes()).hexdigest()
    assert rep.train_tokens == sum(len(e.input_ids) for e in data.train)
    assert rep.train_trained_tokens == sum(e.trained_tokens for e in data.train)
    assert rep.tokens_per_example.min <= rep.tokens_per_example.mean <= rep.tokens_per_example.max
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
    from helpers import classification_rows, write_csv

    rows = classification_rows() + [("the quick brown fox jumps over the lazy dog " * 6, "refund")]
    path = write_csv(tmp_path / "d.csv", rows)
    data = prepare_data(cfg(path, max_length=60), tiny_tokenizer, val_rows=100)
    assert data.report.dropped_too_long.count == 1
    assert data.report.dropped_too_long.first == [f"{path}:77"]
    assert all(len(e.input_ids) <= 60 for e in data.train + data.validation)

    with pytest.raises(TunelabError, match="longer than data.max_length=8"):
        prepare_data(cfg(path, max_length=8), tiny_tokenizer, val_rows=2)


def test_val_rows_zero_means_no_validation(classification_csv, tiny_tokenizer):
    data = prepare_data(cfg(classification_csv), tiny_tokenizer, val_rows=0)
    assert data.validation == [] and data.report.validation_rows_used == 0
    assert len(data.train) == data.report.splits["train"]


# ---------------------------------------------------------------- preference pairs (DPO)



@pytest.mark.parametrize("fmt, rows", [("chosen_rejected", chosen_rejected_rows), ("dpo", dpo_rows)])
def test_prepare_preference_data_in_each_format(tiny_tokenizer, tmp_path, fmt, rows):
    pairs = many_pairs(40)
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows(pairs))
    data = prepare_preference_data(DataConfig(path=path, format=fmt), tiny_tokenizer, val_rows=3)
    rep = data.report
    assert rep.rows == 40 and sum(rep.splits.values()) == 40
    assert rep.splits == {"train": len(data.train_rows), "validation": len(data.validation_rows),
                             "test": len(data.test_rows)}
    assert 24 <= rep.splits["train"] <= 38  # 0.8 of 40, up to hash variation
    assert rep.train_rows_used == len(data.train) == len(data.train_rows)
    assert rep.validation_rows_used == len(data.validation) == min(3, len(data.validation_rows))
    assert rep.dropped_too_long.count == 0 and rep.dropped_too_long.first == []
    assert rep.train_tokens == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in data.train)
    # deterministic, and the same pairs land in the same split whichever format holds them
    again = prepare_preference_data(DataConfig(path=path, format="auto"), tiny_tokenizer, val_rows=3)
    assert [p.source for p in again.train] == [p.source for p in data.train]
    other_rows = dpo_rows if fmt == "chosen_rejected" else chosen_rejected_rows
    other = write_jsonl(tmp_path / "other.jsonl", other_rows(pairs))
    moved = prepare_preference_data(DataConfig(path=other, format="auto"), tiny_tokenizer, val_rows=3)
    assert [p.prompt for p in moved.train_rows] == [p.prompt for p in data.train_rows]
    # labels: exactly the completion and its end-of-turn token
    for tp, pair in zip(data.train, data.train_rows):
        for row, answer in ((tp.chosen, pair.chosen[-1].content), (tp.rejected, pair.rejected[-1].content)):
            trained = [t for t in row.labels if t != IGNORE_INDEX]
            assert tiny_tokenizer.decode(trained) == answer + tiny_tokenizer.eos_token
            first = next(i for i, t in enumerate(row.labels) if t != IGNORE_INDEX)
            assert all(t != IGNORE_INDEX for t in row.labels[first:])  # one contiguous span, at the end


def test_assistant_turns_of_the_prompt_are_not_scored(tiny_tokenizer, tmp_path):
    row = {"prompt": [{"role": "user", "content": "good morning"}, {"role": "assistant", "content": "hello world"},
                      {"role": "user", "content": "what is two plus two"}],
           "chosen": [{"role": "assistant", "content": "four"}], "rejected": [{"role": "assistant", "content": "no"}]}
    path = write_jsonl(tmp_path / "multi.jsonl", [row])
    data = prepare_preference_data(DataConfig(path=path, format="chosen_rejected", split=(1.0, 0.0, 0.0)),
                                   tiny_tokenizer, val_rows=0)
    (tp,) = data.train
    assert tiny_tokenizer.decode([t for t in tp.chosen.labels if t != IGNORE_INDEX]) == "four<|im_end|>"
    assert tiny_tokenizer.decode([t for t in tp.rejected.labels if t != IGNORE_INDEX]) == "no<|im_end|>"
    assert "hello world" in tiny_tokenizer.decode(tp.chosen.input_ids)  # still there, as context


def test_pairs_with_a_too_long_row_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    long = "the quick brown fox jumps over the lazy dog " * 8
    pairs = many_pairs(20) + [("good night", "yes", long), ("good morning", long, "no")]
    path = write_jsonl(tmp_path / "pairs.jsonl", chosen_rejected_rows(pairs))
    data = prepare_preference_data(DataConfig(path=path, format="chosen_rejected", split=(1.0, 0.0, 0.0),
                                              max_length=48), tiny_tokenizer, val_rows=0)
    dropped = data.report.dropped_too_long
    assert dropped.count == 2 and sorted(dropped.first) == [f"{path}:21", f"{path}:22"]  # hash order
    assert len(data.train) == 20 and all(p.length <= 48 for p in data.train)
    with pytest.raises(TunelabError, match="longer than data.max_length=8"):
        prepare_preference_data(DataConfig(path=path, format="chosen_rejected", max_length=8), tiny_tokenizer, 0)


def test_clear_errors_on_data_that_is_not_preference_pairs(tiny_tokenizer, classification_csv, tmp_path):
    csv_cfg = DataConfig(path=classification_csv, format="csv", input_column="text", output_column="label")
    with pytest.raises(TunelabError, match=r"objective dpo needs preference pairs.*format to dpo .*data validate"):
        prepare_preference_data(csv_cfg, tiny_tokenizer, val_rows=0)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}] * 3)
    with pytest.raises(TunelabError, match="holds conversations.*preference tuning needs preference pairs"):
        prepare_preference_data(DataConfig(path=chat, format="auto"), tiny_tokenizer, val_rows=0)
    with pytest.raises(TunelabError, match="data validate"):  # declared dpo, but the rows are chat rows
        prepare_preference_data(DataConfig(path=chat, format="dpo"), tiny_tokenizer, val_rows=0)
