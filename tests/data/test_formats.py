"""tunelab.data.formats / convert: every format reads to the same records as its chat JSONL twin,
detection picks the right format, an explicit format wins, and conversion round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FIXTURES
from tunelab.config import DataConfig
from tunelab.data.convert import convert_file
from tunelab.data.formats import FORMATS, detect_format
from tunelab.data.read import read_conversations, read_preference_pairs
from tunelab.data.records import Message, PreferencePair
from tunelab.data.validate import validate_file
from tunelab.errors import TunelabError

FORMATS_DIR = FIXTURES / "formats"

# file -> (the format auto-detection must report, its chat JSONL twin)
CONVERSATION_FILES = {
    "chat.jsonl": ("chat_jsonl", "chat.jsonl"),
    "prompt_completion.jsonl": ("prompt_completion", "prompt_completion.chat.jsonl"),
    "prompt_completion_messages.jsonl": ("prompt_completion", "prompt_completion_messages.chat.jsonl"),
    "alpaca.json": ("alpaca", "alpaca.chat.jsonl"),
    "alpaca.jsonl": ("alpaca", "alpaca.chat.jsonl"),
    "sharegpt.jsonl": ("sharegpt", "sharegpt.chat.jsonl"),
    "intents.csv": ("csv", "intents.chat.jsonl"),
    "intents.tsv": ("csv", "intents.chat.jsonl"),
}
# preference files -> the format; all three hold the same pairs as dpo.jsonl (OpenAI's shape, what convert writes)
PAIR_FILES = {"dpo.jsonl": "dpo", "chosen_rejected.jsonl": "chosen_rejected", "chosen_rejected_messages.jsonl": "chosen_rejected"}
CSV_COLUMNS = {"input_column": "question", "output_column": "intent"}


def cfg(name: str | Path, fmt: str = "auto", **kw) -> DataConfig:
    return DataConfig(path=FORMATS_DIR / name, format=fmt, **CSV_COLUMNS, **kw)


def messages(convs) -> list[tuple[Message, ...]]:
    return [c.messages for c in convs]


def pairs(items: list[PreferencePair]) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in items]


def test_every_format_has_a_file_here():
    assert {fmt for fmt, _ in CONVERSATION_FILES.values()} | set(PAIR_FILES.values()) == set(FORMATS) - {"auto"}


@pytest.mark.parametrize("name", sorted(CONVERSATION_FILES))
def test_each_format_reads_to_the_conversations_of_its_chat_twin(name):
    fmt, twin = CONVERSATION_FILES[name]
    expected = messages(read_conversations(cfg(twin, "chat_jsonl")))
    assert messages(read_conversations(cfg(name, fmt))) == expected  # explicit format
    assert messages(read_conversations(cfg(name))) == expected  # detected
    assert all(c.source.startswith(f"{FORMATS_DIR / name}:") for c in read_conversations(cfg(name)))


@pytest.mark.parametrize("name", sorted(PAIR_FILES))
def test_each_preference_format_reads_to_the_same_pairs(name):
    expected = pairs(read_preference_pairs(cfg("dpo.jsonl", "dpo")))
    assert pairs(read_preference_pairs(cfg(name, PAIR_FILES[name]))) == expected
    assert pairs(read_preference_pairs(cfg(name))) == expected
    assert expected[1][0] == (Message("user", "Capital of France?"),)
    assert expected[1][1:] == ((Message("assistant", "Paris."),), (Message("assistant", "Lyon, I think."),))


@pytest.mark.parametrize("name", sorted(CONVERSATION_FILES) + sorted(PAIR_FILES))
def test_detection_reports_the_format_and_row_count(name):
    expected = CONVERSATION_FILES[name][0] if name in CONVERSATION_FILES else PAIR_FILES[name]
    report = validate_file(FORMATS_DIR / name, **CSV_COLUMNS)
    assert (report.format, report.detected) == (expected, True)
    assert report.headline() == f"detected: {expected}, {report.rows} rows"
    assert report.errors == [f for f in report.findings if f.kind == "too_few_examples"]  # only: they are small


def test_detection_votes_over_the_first_rows(tmp_path):
    # The first row is chat, most are alpaca: alpaca wins, and the odd row is reported in alpaca's terms.
    rows = [{"messages": []}] + [{"instruction": "a", "output": "b"}] * 3
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = validate_file(path, min_examples=0, recommended_examples=0)
    assert report.format == "alpaca"
    assert [(f.line, f.kind, f.field) for f in report.findings] == [
        (1, "missing_field", "instruction"), (1, "missing_field", "output"), (1, "unknown_key", "messages")]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": []}, "chat_jsonl"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": []}, "sharegpt"),
        ({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}, "dpo"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "chosen_rejected"),
        ({"prompt": "a"}, None),
        ({"question": "a", "answer": "b"}, None),
    ],
)
def test_detect_format_from_keys(row, fmt):
    assert detect_format(row) == fmt


def test_an_explicit_format_overrides_detection():
    report = validate_file(FORMATS_DIR / "alpaca.jsonl", "prompt_completion", min_examples=0, recommended_examples=0)
    assert (report.format, report.detected) == ("prompt_completion", False)
    assert report.headline() == "format: prompt_completion, 4 rows"
    assert {(f.kind, f.field) for f in report.errors} == {("missing_field", "prompt"), ("missing_field", "completion")}
    assert len(report.errors) == 8 and report.examples == 0
    # A .csv read as chat JSONL is not sniffed as CSV.
    assert validate_file(FORMATS_DIR / "intents.csv", "chat_jsonl", min_examples=0).errors[0].kind == "invalid_json"


# ---------------------------------------------------------------- the training path


def test_system_prompt_goes_before_conversations_without_one():
    convs = read_conversations(cfg("sharegpt.jsonl", system_prompt="Be kind."))
    assert [c.messages[0] for c in convs] == [
        Message("system", "Be kind."), Message("system", "You are a pirate."), Message("system", "Use tools.")]
    (pair, _) = read_preference_pairs(cfg("dpo.jsonl", system_prompt="Be kind."))
    assert pair.prompt == (Message("system", "Be kind."), Message("user", "2+2?"))


def test_sft_and_preference_readers_refuse_each_others_data():
    with pytest.raises(TunelabError, match="preference pairs") as info:
        read_conversations(cfg("dpo.jsonl"))
    assert info.value.where == str(FORMATS_DIR / "dpo.jsonl")
    with pytest.raises(TunelabError, match="holds conversations"):
        read_preference_pairs(cfg("alpaca.json"))


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", sorted(CONVERSATION_FILES))
def test_convert_round_trips_to_chat_jsonl(name, tmp_path):
    out = tmp_path / "out.jsonl"
    report = convert_file(FORMATS_DIR / name, out, **CSV_COLUMNS)
    assert report.examples == len(out.read_text(encoding="utf-8").splitlines())  # no line splits inside a row
    converted = read_conversations(DataConfig(path=out, format="auto"))
    assert messages(converted) == messages(read_conversations(cfg(name)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize("name", sorted(PAIR_FILES))
def test_convert_writes_preference_pairs_as_openai_dpo(name, tmp_path):
    out = tmp_path / "out.jsonl"
    convert_file(FORMATS_DIR / name, out)
    assert out.read_text(encoding="utf-8") == (FORMATS_DIR / "dpo.jsonl").read_text(encoding="utf-8")
    assert pairs(read_preference_pairs(DataConfig(path=out, format="dpo"))) == pairs(read_preference_pairs(cfg(name)))


def test_convert_keeps_weights_and_refuses_a_file_with_errors(tmp_path):
    out = tmp_path / "out.jsonl"
    convert_file(FORMATS_DIR / "chat.jsonl", out)
    assert out.read_text(encoding="utf-8") == (FORMATS_DIR / "chat.jsonl").read_text(encoding="utf-8").replace(
        ', "weight": 1', "")  # weight 1 is the default, so only weight 0 is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "a"}]}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match="unknown role 'bot'"):
        convert_file(bad, out)
    assert read_conversations(DataConfig(path=out))  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.jsonl"]
