"""tunelab.data.validate: every problem of a file at once, at its line and field, of a stable kind."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from helpers import FIXTURES
from tunelab.config import DataConfig
from tunelab.data.findings import KINDS, Finding
from tunelab.data.read import read_conversations
from tunelab.data.validate import validate_bytes, validate_file
from tunelab.errors import TunelabError

MALFORMED = FIXTURES / "malformed"
MANIFEST = json.loads((MALFORMED / "expected.json").read_text(encoding="utf-8"))
CASES = {name: spec for name, spec in MANIFEST.items() if not name.startswith("_")}
NEEDS_A_TOKENIZER_OR_HUGE_INPUT = {"template_error", "too_long", "invalid_csv"}  # tested below instead


def chat(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = chat(("user", "Where is my card?"), ("assistant", "card_arrival"))


# ---------------------------------------------------------------- the malformed corpus


def test_the_corpus_is_complete():
    files = {p.name for p in MALFORMED.iterdir()} - {"expected.json"}
    assert files == set(CASES), "every file has an entry in expected.json, and every entry a file"
    assert len(CASES) >= 40
    kinds = {kind for spec in CASES.values() for _, kind, _ in spec["findings"]}
    assert kinds == set(KINDS) - NEEDS_A_TOKENIZER_OR_HUGE_INPUT, "each finding kind is exercised by some file"


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_file(name):
    spec = CASES[name]
    sizes = {} if spec.get("size_checks") else {"min_examples": 0, "recommended_examples": 0}
    report = validate_file(MALFORMED / name, spec.get("format", "auto"), **sizes)
    assert [[f.line, f.kind, f.field] for f in report.findings] == spec["findings"]
    # Every finding is one printable line that says where, what and how to fix it.
    for finding in report.findings:
        line = finding.render(MALFORMED / name)
        assert "\n" not in line and line.startswith(f"{MALFORMED / name}") and "(fix: " in line
    # A record is kept exactly for the rows without an error.
    error_lines = {f.line for f in report.errors}
    assert all(int(r.source.rsplit(":", 1)[1]) not in error_lines for r in report.conversations + report.pairs)


def test_errors_and_warnings_keep_their_severity_and_counts():
    report = validate_file(MALFORMED / "several_problems.jsonl")
    assert report.counts() == {"empty_assistant_content": 1, "invalid_json": 1, "last_not_assistant": 1,
                               "not_an_object": 1, "too_few_examples": 1, "unknown_role": 1,
                               "repeated_role": 1, "unknown_key": 1}
    assert [f.kind for f in report.warnings] == ["repeated_role", "unknown_key"]
    assert report.rows == 6 and report.examples == 2  # line 1 and line 6 (a warning only)
    payload = json.loads(json.dumps(report.to_json()))
    assert payload["ok"] is False
    assert payload["counts"]["errors"] == 6 and payload["counts"]["warnings"] == 2
    assert payload["findings"][0] == {"line": 2, "field": "", "kind": "invalid_json", "severity": "error",
                                      "message": "invalid JSON at column 47: Expecting ',' delimiter",
                                      "fix": "write one complete JSON object per line, or a single JSON array of objects"}


def test_not_utf8_names_the_byte_and_still_reads_the_rest(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
                     + json.dumps(chat(("bot", "x"), ("assistant", "y"))).encode() + b"\n")
    report = validate_file(path, min_examples=0, recommended_examples=0)
    offset = len(json.dumps(GOOD)) + 1 + len(b'{"messages": [{"role": "user", "content": "caf')
    assert [(f.line, f.kind) for f in report.findings] == [(2, "not_utf8"), (2, "no_assistant_message"), (3, "unknown_role")]
    assert f"byte {offset}: 0xe9" in report.findings[0].message
    assert len(report.conversations) == 1


def test_size_checks(tmp_path):
    def kinds(n: int) -> list[str]:
        return [f.kind for f in validate_file(jsonl(tmp_path / f"{n}.jsonl", [GOOD] * n)).findings]

    assert kinds(9) == ["too_few_examples"]
    assert kinds(10) == kinds(99) == ["few_examples"]
    assert kinds(100) == []
    assert kinds(0) == ["empty_file"]


def test_invalid_csv_stops_reading_at_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhi,greet\n\"a very long cell\",x\nbye,farewell\n", encoding="utf-8")
    old = csv.field_size_limit(8)
    try:
        report = validate_file(path, min_examples=0, recommended_examples=0)
    finally:
        csv.field_size_limit(old)
    assert [(f.line, f.kind) for f in report.findings] == [(3, "invalid_csv")]
    assert len(report.conversations) == 1


def test_usage_errors_raise(tmp_path):
    with pytest.raises(TunelabError, match="data file not found"):
        validate_file(tmp_path / "missing.jsonl")
    with pytest.raises(TunelabError, match="unknown data format 'yaml'") as info:
        validate_bytes(b"", tmp_path / "d.jsonl", "yaml")
    assert "alpaca" in info.value.fix


# ---------------------------------------------------------------- lengths under the chat template


def test_too_long_examples_are_warned_with_their_token_count(tmp_path, tiny_tokenizer):
    def tokens(row: dict) -> int:
        rendered = tiny_tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"])

    long = chat(("user", "where is my card " * 20), ("assistant", "card_arrival"))
    n, limit = tokens(long), tokens(GOOD)  # GOOD fits exactly
    path = jsonl(tmp_path / "d.jsonl", [GOOD, long, GOOD, long])
    report = validate_file(path, tokenizer=tiny_tokenizer, max_length=limit, min_examples=0, recommended_examples=0)
    assert [(f.line, f.kind, f.severity) for f in report.findings] == [(2, "too_long", "warning"), (4, "too_long", "warning")]
    assert report.findings[0].message == f"{n:,} tokens once rendered with the chat template, over {limit:,}"
    assert report.notes == [f"lengths: 2 of 4 examples are longer than {limit} tokens (longest {n:,})"]


def test_preference_pairs_are_measured_by_their_longer_side(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "hi", "chosen": "ok", "rejected": "no " * 60}, {"prompt": "hi", "chosen": "ok", "rejected": "no"}]
    report = validate_file(jsonl(tmp_path / "p.jsonl", rows), tokenizer=tiny_tokenizer, max_length=60,
                           min_examples=0, recommended_examples=0)
    assert [(f.line, f.kind) for f in report.findings] == [(1, "too_long")]


def test_without_a_tokenizer_the_length_check_is_skipped_with_a_note(tmp_path):
    report = validate_file(jsonl(tmp_path / "d.jsonl", [GOOD]), min_examples=0, recommended_examples=0)
    assert report.findings == [] and "lengths not checked" in report.notes[0]


def test_a_chat_template_that_refuses_a_conversation(tmp_path, tiny_tokenizer):
    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    path = jsonl(tmp_path / "d.jsonl", [GOOD, chat(("user", "a"), ("user", "b"), ("assistant", "c"))])
    report = validate_file(path, tokenizer=strict, min_examples=0, recommended_examples=0)
    assert [(f.line, f.kind) for f in report.findings] == [(2, "repeated_role"), (2, "template_error")]
    assert "roles must alternate" in report.findings[1].message


# ---------------------------------------------------------------- the training path reads through the validator


def test_read_conversations_names_the_first_error_and_counts_the_rest(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [GOOD, chat(("bot", "a"), ("assistant", "b")), {"x": 1}, chat(("user", "a"))])
    with pytest.raises(TunelabError) as info:
        read_conversations(DataConfig(path=path, format="chat_jsonl"))
    assert info.value.where == f"{path}:2: messages[0].role"
    assert info.value.what == "unknown role 'bot' (and 2 more errors)"
    assert f"`tunelab data validate {path}` lists every problem" in info.value.fix


def test_read_conversations_ignores_warnings_and_size_checks(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"id": 1, **GOOD}])
    (row,) = read_conversations(DataConfig(path=path, format="chat_jsonl"))
    assert row.answer == "card_arrival"


def test_finding_prints_as_one_line():
    finding = Finding("unknown_role", 3, "messages[1].role", "unknown role 'bot'", "use one of ['user']")
    assert finding.render("d.jsonl") == "d.jsonl:3: messages[1].role: unknown role 'bot' (fix: use one of ['user'])"
    assert Finding("empty_file", None, "", "no examples in the file", "add examples").render("d.jsonl") == (
        "d.jsonl: no examples in the file (fix: add examples)")
    with pytest.raises(AssertionError, match="unregistered"):
        Finding("no_such_kind", 1, "", "", "")
