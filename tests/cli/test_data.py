"""`tunelab data validate` / `tunelab data convert`: exit codes 0 / 1 / 2, one line per finding, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from helpers import FIXTURES
from tunelab.cli import app

MALFORMED = FIXTURES / "malformed"
FORMATS_DIR = FIXTURES / "formats"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def good_file(path: Path, rows: int = 12) -> Path:
    row = {"messages": [{"role": "user", "content": "Where is my card?"}, {"role": "assistant", "content": "card_arrival"}]}
    path.write_text((json.dumps(row) + "\n") * rows, encoding="utf-8")
    return path


def test_validate_exit_0_with_only_warnings(tmp_path):
    data = good_file(tmp_path / "d.jsonl")
    proc = run_cli("data", "validate", "d.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "detected: chat_jsonl, 12 rows"
    assert "d.jsonl: only 12 examples, fewer than 100 (fix: " in proc.stdout
    assert "note: lengths not checked" in proc.stdout
    assert data.read_text(encoding="utf-8").count("\n") == 12


def test_validate_exit_1_prints_one_line_per_finding(tmp_path):
    # COLUMNS=80: long lines must still not wrap, so each finding stays greppable as file:line.
    proc = run_cli("data", "validate", "several_problems.jsonl", cwd=MALFORMED)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    findings = [line for line in lines if line.startswith("several_problems.jsonl")]
    assert len(findings) == 8
    assert "several_problems.jsonl:3: messages[0].role: unknown role 'bot' (fix: use one of " in lines[lines.index("errors (6):") + 2]
    assert lines.index("errors (6):") < lines.index("warnings (2):") < lines.index("summary: 6 errors, 2 warnings in 6 rows")
    assert any(line.split() == ["error", "invalid_json", "1"] for line in lines)
    assert all(len(line) > 80 for line in findings[:3])  # not wrapped although longer than the terminal


def test_validate_json_output(tmp_path):
    proc = run_cli("data", "validate", str(MALFORMED / "alpaca_array_bad_elements.json"), "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    payload = json.loads(proc.stdout)
    assert (payload["format"], payload["detected"], payload["rows"], payload["examples"]) == ("alpaca", True, 4, 2)
    assert [(f["line"], f["kind"], f["field"], f["severity"]) for f in payload["findings"]] == [
        (6, "not_an_object", "", "error"), (7, "wrong_type", "output", "error"), (8, "unknown_key", "history", "warning"),
        (None, "too_few_examples", "", "error")]
    assert payload["counts"] == {"errors": 3, "warnings": 1,
                                 "by_kind": {"not_an_object": 1, "too_few_examples": 1, "wrong_type": 1, "unknown_key": 1}}


def test_validate_exit_2_on_usage_errors(tmp_path):
    for args, fragment in (((str(tmp_path / "missing.jsonl"),), "data file not found"),
                           ((str(MALFORMED / "empty.jsonl"), "--format", "yaml"), "unknown data format 'yaml'")):
        proc = run_cli("data", "validate", *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert fragment in line and "(fix: " in line


def test_validate_with_a_model_checks_lengths(tmp_path, tiny_model_dir):
    data = good_file(tmp_path / "d.jsonl", rows=100)
    result = CliRunner().invoke(app, ["data", "validate", str(data), "--model", str(tiny_model_dir), "--max-length", "8",
                                      "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["counts"]["by_kind"] == {"too_long": 100}
    assert payload["notes"][0].startswith("lengths: 100 of 100 examples are longer than 8 tokens")


def test_validate_csv_with_column_options():
    result = CliRunner().invoke(app, ["data", "validate", str(FORMATS_DIR / "intents.csv"), "--input-column", "question",
                                      "--output-column", "intent"])
    assert result.exit_code == 1  # 3 rows: too few examples
    assert "detected: csv, 3 rows" in result.stdout and "missing_column" not in result.stdout


def test_convert(tmp_path):
    proc = run_cli("data", "convert", str(FORMATS_DIR / "sharegpt.jsonl"), "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "detected: sharegpt, 3 rows; wrote 3 conversations to out.jsonl"
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == (FORMATS_DIR / "sharegpt.chat.jsonl").read_text(
        encoding="utf-8")
    proc = run_cli("data", "convert", str(MALFORMED / "unknown_role.jsonl"), "-o", "bad.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown role 'bot'" in proc.stderr and "tunelab data validate" in proc.stderr
    assert not (tmp_path / "bad.jsonl").exists()
