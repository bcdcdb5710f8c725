"""tunelab.data.quality.lint: planted problems found at their lines, clean data left alone, PII never printed, exit codes."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from helpers import BOT, CHAT_TEMPLATE, EOT, REPO
from tunelab.cli import app
from tunelab.data.findings import LINT_KINDS
from tunelab.data.quality.lint import lint_file
from tunelab.errors import TunelabError

BANKING77 = REPO / "examples" / "banking77" / "train.csv"
BASE = ("I ordered a replacement card two weeks ago and it still has not arrived at my home "
        "address, please check")  # 20 words
SECRETS = ("jane.doe@example.com", "4242 4242 4242 4242", "DE89 3704 0044 0532 0130 00", "123-45-6789",
           "81.2.69.142", "+44 20 7946 0958")


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def banking77(n: int = 200) -> list[tuple[str, str]]:
    with BANKING77.open(encoding="utf-8", newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)][:n]


def planted(tmp_path: Path) -> tuple[Path, Path]:
    """train.jsonl: 200 Banking77 rows (lines 1-200), then one planted problem a line; test.jsonl: leaks."""
    rows = [chat(text, label) for text, label in banking77()]
    rows += [
        chat(BASE, "card_arrival"),  # 201
        chat(BASE.replace("replacement", "new"), "card_arrival"),  # 202: one word changed -> near duplicate of 201
        chat("How do I close my account today?", "terminate_account"),  # 203
        chat("  how do I close my\tACCOUNT today?", "terminate_account"),  # 204: exact duplicate of 203
        chat("How do I close my account today?", "cancel_account"),  # 205: conflicting answers with 203
        chat("My e-mail is jane.doe@example.com, my card 4242 4242 4242 4242", "card_linking"),  # 206
        chat("Pay it to DE89 3704 0044 0532 0130 00, my SSN is 123-45-6789", "card_linking"),  # 207
        chat("I logged in from 81.2.69.142, call me on +44 20 7946 0958", "card_linking"),  # 208
        # 209: numbers of the right shape with wrong checksums or invalid SSN areas: no PII.
        chat("card 4242 4242 4242 4241, IBAN DE89 3704 0044 0532 0130 01, SSN 666-12-3456 or 900-12-3456",
             "card_linking"),
    ]
    test = [
        chat(banking77()[4][0], banking77()[4][1]),  # 1: a training prompt and answer -> leakage_exact
        chat(BASE.replace("home", "flat"), "card_arrival"),  # 2: near a training row -> leakage_near
        chat("Can I pay my rent with a cheque from abroad?", "transfer"),  # 3: new
        chat(banking77()[9][0].upper() + "  ", "something_else"),  # 4: same prompt up to case, other answer
    ]
    return jsonl(tmp_path / "train.jsonl", rows), jsonl(tmp_path / "test.jsonl", test)


def found(report) -> list[tuple[str, int | None, str]]:
    return [(Path(f.path).name, f.finding.line, f.kind) for f in report.findings]


def test_planted_problems_are_found_at_their_lines(tmp_path):
    train, test = planted(tmp_path)
    report = lint_file(train, against=test)
    assert found(report) == [
        ("train.jsonl", 205, "conflicting_answers"),
        ("test.jsonl", 1, "leakage_exact"),
        ("test.jsonl", 4, "leakage_exact"),
        ("test.jsonl", 2, "leakage_near"),
        ("train.jsonl", 204, "exact_duplicate"),
        # Banking77 itself has near duplicates (one word apart): lines 89, 98, 117; see test_banking77_slice_is_clean.
        ("train.jsonl", 89, "near_duplicate"), ("train.jsonl", 98, "near_duplicate"),
        ("train.jsonl", 117, "near_duplicate"), ("train.jsonl", 202, "near_duplicate"),
        ("train.jsonl", 206, "pii_email"), ("train.jsonl", 208, "pii_phone"), ("train.jsonl", 206, "pii_card_number"),
        ("train.jsonl", 207, "pii_iban"), ("train.jsonl", 207, "pii_ssn"), ("train.jsonl", 208, "pii_ip_address"),
        ("train.jsonl", 203, "rare_label"), ("train.jsonl", 205, "rare_label"),
        ("train.jsonl", None, "label_imbalance"),
    ]
    messages = {(Path(f.path).name, f.finding.line, f.kind): f.finding.message for f in report.findings}
    assert messages["train.jsonl", 204, "exact_duplicate"].startswith("same as line 203 ")
    assert messages["train.jsonl", 202, "near_duplicate"].startswith("near duplicate of line 201 (similarity 0.87)")
    assert messages["train.jsonl", 205, "conflicting_answers"].startswith(
        "same prompt as line 203, different answer: 'cancel_account' here, 'terminate_account' there")
    assert messages["test.jsonl", 1, "leakage_exact"].startswith(f"prompt also in {train}:5 (same answer)")
    assert messages["test.jsonl", 4, "leakage_exact"].startswith(f"prompt also in {train}:10 (different answer)")
    assert messages["test.jsonl", 2, "leakage_near"].startswith(f"prompt nearly the same as {train}:201")
    assert messages["train.jsonl", 206, "pii_card_number"] == "payment card number in the user message: **** **** **** 4242"
    assert report.labels == {"card_arrival": 155, "card_linking": 51, "terminate_account": 2, "cancel_account": 1}
    assert [f.kind for f in report.errors] == ["conflicting_answers", "leakage_exact", "leakage_exact", "leakage_near"]


def test_banking77_slice_is_clean(tmp_path):
    # The first 200 rows of the demo data, read as CSV: no exact duplicates, conflicts, PII or label
    # problems. It does hold near duplicates, genuine one-word paraphrases, and lint says so.
    path = tmp_path / "slice.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "category"), *banking77()])
    report = lint_file(path, "csv", input_column="text", output_column="category")
    assert report.linted == 200 and report.errors == []
    assert {f.kind for f in report.findings} == {"near_duplicate"}
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [(lines[f.finding.line - 1], f.finding.message.split(" (")[0]) for f in report.findings]
    assert pairs == [
        ("Can you tell me why I haven't received my new card yet?,card_arrival", "near duplicate of line 46"),
        ("Is there a reason my new card hasn't arrived?,card_arrival", "near duplicate of line 82"),
        ("How do I track the card you sent to me?,card_arrival", "near duplicate of line 28"),
    ]
    assert lines[45] == "Can you tell me why I haven't received my new card?,card_arrival"
    assert report.labels == {"card_arrival": 153, "card_linking": 47}


def test_cli_output_one_line_per_finding_grouped_with_pii_masked(tmp_path):
    train, test = planted(tmp_path)
    result = CliRunner().invoke(app, ["data", "lint", str(train), "--against", str(test)])
    assert result.exit_code == 1, result.output  # leakage and conflicts are errors
    lines = result.output.splitlines()
    assert lines[0] == f"lint: {train} (chat_jsonl, 209 rows), against {test} (4 rows)"
    assert lines.index("errors (4):") < lines.index("warnings (14):") < lines.index("summary: 4 errors, 14 warnings in 209 rows")
    assert lines[lines.index("errors (4):") + 1].startswith("conflicting_answers (1)  fix: ")
    assert f"  {train}:204: exact_duplicate: same as line 203 (ignoring case and spacing): " in result.output
    assert f"  {test}:2: leakage_near: prompt nearly the same as {train}:201 (similarity 0." in result.output
    assert f"  {train}:207: pii_ssn: US social security number in the user message: ***-**-6789" in lines
    assert "labels (4): card_arrival 155, card_linking 51, terminate_account 2, cancel_account 1" in lines
    assert any(line.split() == ["error", "leakage_exact", "2"] for line in lines)
    for secret in SECRETS:
        assert secret not in result.output


def test_cli_json_and_exit_0_with_only_warnings(tmp_path):
    train, _ = planted(tmp_path)
    result = CliRunner().invoke(app, ["data", "lint", str(train), "--json", "--threshold", "0.95"])
    assert result.exit_code == 1  # the conflict
    payload = json.loads(result.output)
    assert payload["counts"]["by_kind"]["conflicting_answers"] == 1
    assert "near_duplicate" not in payload["counts"]["by_kind"]  # none as close as 0.95
    assert all(set(f) == {"file", "line", "field", "kind", "severity", "message", "fix"} for f in payload["findings"])
    for secret in SECRETS:
        assert secret not in result.output
    only_warnings = jsonl(tmp_path / "w.jsonl", [chat(f"question number {i} about cards", "a") for i in range(20)]
                          + [chat("question number 1 about cards", "a")])
    result = CliRunner().invoke(app, ["data", "lint", str(only_warnings), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"errors": 0, "warnings": 1, "by_kind": {"exact_duplicate": 1}}


def test_usage_errors_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "data", "lint", "missing.jsonl"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "data file not found: missing.jsonl (fix: " in proc.stderr
    train, _ = planted(tmp_path)
    for args in (["--threshold", "1.5"], ["--against", str(tmp_path / "nope.jsonl")], ["--format", "yaml"]):
        result = CliRunner().invoke(app, ["data", "lint", str(train), *args])
        assert isinstance(result.exception, TunelabError), (args, result.output)  # main() prints it, exits 2


def test_rows_with_validation_errors_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("hi", "hello")) + "\n{broken\n" + json.dumps(chat("hi", "hello")) + "\n")
    report = lint_file(path)
    assert found(report) == [("d.jsonl", 3, "exact_duplicate")]
    assert report.linted == 2 and report.rows == 3
    assert report.notes[0].startswith("1 rows with validation errors were not linted")


def test_preference_pairs_are_checked_for_duplicates_and_pii_not_conflicts(tmp_path):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
            {"prompt": "capital of  France?", "chosen": "Paris.", "rejected": "Lyon."},
            {"prompt": "Capital of France?", "chosen": "Paris, mail a@b.io", "rejected": "Nice."}]
    report = lint_file(jsonl(tmp_path / "p.jsonl", rows))
    assert found(report) == [("p.jsonl", 2, "exact_duplicate"), ("p.jsonl", 3, "pii_email")]
    assert report.findings[1].finding.message == "e-mail address in the chosen assistant message: a***@b***.io"
    assert report.labels is None


# ---------------------------------------------------------------- under a chat template


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Character tokens plus one merge, "\\n" + "h", across the boundary between the header and an answer."""
    chars = sorted(set("systemuserassistantYou are a helpful assistant.\nhello where is it card_arrival"))
    vocab = {c: i for i, c in enumerate(chars)} | {"\nh": len(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "h")]))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOT, eos_token=EOT, pad_token=EOT,
                                        additional_special_tokens=[BOT, EOT])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def template_cases(tmp_path: Path, tiny_tokenizer) -> dict[str, object]:
    rows = [chat("where is it", "card_arrival"), chat("where is it now", " card_arrival "), chat("where is it", "hello")]
    path = jsonl(tmp_path / "t.jsonl", rows)
    trimming = copy.deepcopy(tiny_tokenizer)  # like Llama 3's template: answers are trimmed
    trimming.chat_template = CHAT_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    no_eot = copy.deepcopy(tiny_tokenizer)  # assistant turns never closed with <|im_end|>
    no_eot.chat_template = CHAT_TEMPLATE.replace("message['content'] + '<|im_end|>'",
                                                 "message['content'] + ('' if message['role'] == 'assistant' else '<|im_end|>')")
    refusing = copy.deepcopy(tiny_tokenizer)
    refusing.chat_template = "{% if messages | length > 1 and messages[1]['content'] == 'hello' %}{{ raise_exception('no hello') }}{% endif %}" + CHAT_TEMPLATE
    return {name: lint_file(path, tokenizer=tok) for name, tok in
            (("chatml", tiny_tokenizer), ("trimming", trimming), ("no_eot", no_eot), ("merging", merging_tokenizer()),
             ("refusing", refusing))}


def test_template_round_trip(tmp_path, tiny_tokenizer):
    reports = template_cases(tmp_path, tiny_tokenizer)
    kinds = {name: [(f.finding.line, f.kind) for f in r.findings if f.kind.startswith("template")]
             for name, r in reports.items()}
    assert kinds == {
        "chatml": [],
        "trimming": [(2, "template_roundtrip")],  # " card_arrival " is rendered without its spaces
        "no_eot": [(1, "template_roundtrip"), (2, "template_roundtrip"), (3, "template_roundtrip")],
        "merging": [(3, "template_roundtrip")],  # "\nh" straddles the answer's first character
        "refusing": [(3, "template_error")],
    }
    merging = next(f.finding for f in reports["merging"].findings if f.kind == "template_roundtrip")
    assert merging.message == ("assistant turn 1: the answer does not survive tokenization: the trained tokens decode "
                               "to 'ello<|im_end|>', the turn is 'hello<|im_end|>'")
    no_eot = next(f.finding for f in reports["no_eot"].findings if f.kind == "template_roundtrip")
    assert "does not close the assistant turn with '<|im_end|>'" in no_eot.message
    lengths = reports["chatml"].lengths
    assert lengths is not None and lengths["rows"] == 3 and lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    assert any(n.startswith("tokens per row under the chat template: min ") for n in reports["chatml"].notes)


def test_cli_with_a_model_checks_the_template(tmp_path, tiny_model_dir):
    path = jsonl(tmp_path / "d.jsonl", [chat(f"where is card {i}", "card_arrival") for i in range(12)])
    result = CliRunner().invoke(app, ["data", "lint", str(path), "--model", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["findings"] == [] and payload["lengths"]["rows"] == 12
    assert 10 < payload["lengths"]["min"] <= payload["lengths"]["median"] <= payload["lengths"]["max"]  # rendered whole


def test_every_lint_kind_is_exercised(tmp_path, tiny_tokenizer):
    train, test = planted(tmp_path)
    kinds = {f.kind for f in lint_file(train, against=test).findings}
    kinds |= {f.kind for r in template_cases(tmp_path, tiny_tokenizer).values() for f in r.findings}
    assert set(LINT_KINDS) <= kinds


@pytest.mark.parametrize("threshold", [0.0, -1, 1.01])
def test_threshold_must_be_a_fraction(tmp_path, threshold):
    with pytest.raises(TunelabError, match="similarity threshold"):
        lint_file(jsonl(tmp_path / "d.jsonl", [chat("a", "b")]), threshold=threshold)
