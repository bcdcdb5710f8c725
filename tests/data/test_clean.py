"""tunelab.data.clean: the original untouched, every change logged, and the output validates and lints clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.clean import clean_file, log_path
from tunelab.data.quality.lint import lint_file
from tunelab.data.validate import validate_file
from tunelab.errors import TunelabError


def alpaca(instruction: str, output: str, **extra) -> dict:
    return {"instruction": instruction, "input": "", "output": output, **extra}


def dirty(path: Path) -> Path:
    rows = [json.dumps(alpaca(f"question {i} about my card", f"answer {i}")) for i in range(1, 13)]  # lines 1-12
    rows += [
        json.dumps({"instruction": "no answer here"}),  # 13: missing output -> dropped
        "{not json",  # 14: invalid JSON -> dropped
        json.dumps(alpaca("QUESTION 1 about  my card", "answer 1")),  # 15: exact duplicate of line 1 -> dropped
        json.dumps(alpaca("Mail jane.doe@example.com, card 4242 4242 4242 4242", "ok", note="x")),  # 16
        json.dumps(alpaca("question 1 about my card", "a different answer")),  # 17: a conflict: kept, not guessed at
    ]
    path.write_bytes(("\n".join(rows) + "\n").encode("utf-8"))
    return path


def test_clean_drops_dedups_masks_and_logs_every_change(tmp_path):
    src = dirty(tmp_path / "data.jsonl")
    before = src.read_bytes()
    out = tmp_path / "out" / "clean.jsonl"
    result = clean_file(src, out, mask=True)

    assert src.read_bytes() == before  # the original is never modified
    assert result.log == log_path(out) == tmp_path / "out" / "clean.log.jsonl"
    log = [json.loads(line) for line in result.log.read_text(encoding="utf-8").splitlines()]
    assert [(c["line"], c["action"], c["kind"]) for c in log] == [
        (13, "dropped", "missing_field"),
        (14, "dropped", "invalid_json"),
        (15, "dropped", "exact_duplicate"),
        (16, "removed_field", "unknown_key"),
        (16, "masked", "pii_email"),
        (16, "masked", "pii_card_number"),
    ]
    assert log[2]["reason"] == "same as line 1 (ignoring case and spacing)"
    assert log[4]["reason"] == "e-mail address in the user message: j***@e***.com"
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert result.written == len(written) == 17 - 3
    assert written[12]["messages"][0]["content"] == "Mail j***@e***.com, card **** **** **** 4242"
    assert all(set(row) == {"messages"} for row in written)  # chat JSONL; the unknown key is gone
    assert "jane.doe" not in out.read_text(encoding="utf-8") + result.log.read_text(encoding="utf-8")

    # The output re-validates without a finding, and lint finds no duplicates or PII in it (the conflict stays).
    assert validate_file(out, min_examples=0, recommended_examples=0).findings == []
    assert {f.kind for f in lint_file(out).findings} == {"conflicting_answers"}


def test_without_mask_pii_contents_are_kept(tmp_path):
    result = clean_file(dirty(tmp_path / "data.jsonl"), tmp_path / "clean.jsonl")
    assert result.count("masked") == 0 and result.count("dropped") == 3
    assert "jane.doe@example.com" in result.out.read_text(encoding="utf-8")


def test_cli_clean_and_refusing_to_overwrite_the_input(tmp_path):
    src = dirty(tmp_path / "data.jsonl")
    before = src.read_bytes()
    result = CliRunner().invoke(app, ["data", "clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--mask-pii"])
    assert result.exit_code == 0, result.output
    assert f"wrote 14 conversations to {tmp_path / 'c.jsonl'}" in result.output
    assert any(line.split() == ["dropped", "exact_duplicate", "1"] for line in result.output.splitlines())
    assert f"log: {tmp_path / 'c.log.jsonl'} (6 changes)" in result.output
    with pytest.raises(TunelabError, match="would overwrite the input file"):
        clean_file(src, src)
    named_like_a_log = tmp_path / "x.log.jsonl"  # -o x.jsonl would write its log over it
    named_like_a_log.write_bytes(before)
    with pytest.raises(TunelabError, match="would overwrite the input file"):
        clean_file(named_like_a_log, tmp_path / "x.jsonl")
    assert src.read_bytes() == named_like_a_log.read_bytes() == before


def test_nothing_to_keep_is_a_usage_error(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"x": 1}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match="no row of .* can be kept"):
        clean_file(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
