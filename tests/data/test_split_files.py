"""`tunelab data split`: files and report written, sizes add up, stable under appends, leakage between splits reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import REPO
from tunelab.cli import app
from tunelab.data.quality.overlap import split_leakage
from tunelab.data.records import Conversation, Message
from tunelab.data.split import split_conversations
from tunelab.data.split_files import REPORT_NAME, parse_fractions, split_file
from tunelab.errors import TunelabError

BASE = ("I ordered a replacement card two weeks ago and it still has not arrived at my home "
        "address, please check")


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def conv(row: dict) -> Conversation:
    return Conversation(tuple(Message(m["role"], m["content"]) for m in row["messages"]), "x:1")


def split_of(row: dict) -> str:
    """Where split.py puts this row: a function of the row alone."""
    split = split_conversations([conv(row)])
    return next(name for name, n in split.sizes().items() if n)


def banking77(n: int) -> list[dict]:
    with (REPO / "examples" / "banking77" / "train.csv").open(encoding="utf-8", newline="") as f:
        return [chat(r["text"], r["category"]) for r in csv.DictReader(f)][:n]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_splits(outdir: Path) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (outdir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            for name in ("train", "validation", "test")}


def crossing(original: dict, variants: list[dict]) -> dict:
    """The first variant that split.py puts in another split than `original` (deterministic: hashes)."""
    return next(v for v in variants if split_of(v) != split_of(original))


def test_files_sizes_and_report(tmp_path):
    rows = banking77(300)
    result = split_file(write(tmp_path / "d.jsonl", rows), tmp_path / "out")
    parts = read_splits(tmp_path / "out")
    assert sorted(json.dumps(r, sort_keys=True) for p in parts.values() for r in p) == \
        sorted(json.dumps(r, sort_keys=True) for r in rows)  # every row exactly once
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text(encoding="utf-8"))
    assert report == result.report
    assert report["sizes"] == {name: len(p) for name, p in parts.items()} and sum(report["sizes"].values()) == 300
    assert report["stratified"] and set(report["labels"]) == {"card_arrival", "card_linking", "exchange_rate"}
    for label, per_split in report["labels"].items():
        assert per_split == {name: sum(r["messages"][-1]["content"] == label for r in p) for name, p in parts.items()}
    assert set(report["leakage"]) == {"validation", "test"}


def test_stable_when_rows_are_appended(tmp_path):
    rows = banking77(400)
    split_file(write(tmp_path / "a.jsonl", rows[:250]), tmp_path / "a")
    split_file(write(tmp_path / "b.jsonl", rows), tmp_path / "b")
    before = {json.dumps(r): name for name, p in read_splits(tmp_path / "a").items() for r in p}
    after = {json.dumps(r): name for name, p in read_splits(tmp_path / "b").items() for r in p}
    assert len(before) == 250 and len(after) == 400
    assert {row: after[row] for row in before} == before  # no old row moved


def test_identical_rows_never_cross_splits_and_what_can_cross_is_reported(tmp_path):
    rows = banking77(200)
    same = chat("Please freeze my card right now", "card_linking")
    stolen = chat("My card was stolen this morning", "card_linking")
    # Other capitalisations of `stolen` hash differently, so one of them lands in another split.
    recased = crossing(stolen, [chat("My card was stolen this morning".replace(w, w.upper()), "card_linking")
                                for w in "My card was stolen this morning".split()])
    near = crossing(chat(BASE, "card_arrival"), [chat(BASE.replace("home", w), "card_arrival")
                                                 for w in ("flat", "house", "office", "work", "new", "old", "usual")])
    planted = [same] * 5 + [stolen, recased, chat(BASE, "card_arrival"), near]
    result = split_file(write(tmp_path / "d.jsonl", rows + planted), tmp_path / "out")
    parts = read_splits(tmp_path / "out")

    # Exact duplicates: all five copies in one split, by construction, and so never reported.
    assert sum(same in p for p in parts.values()) == 1 and sum(p.count(same) for p in parts.values()) == 5
    leaks = [leak for name in ("validation", "test") for leak in result.leakage[name]]
    assert not any(leak.source.endswith((":201", ":202", ":203", ":204", ":205")) for leak in leaks)
    # What can cross is found, whichever side of train the pair fell on.
    by_line = {int(leak.source.rsplit(":", 1)[1]): leak for leak in leaks}
    by_train_line = {int(leak.train_source.rsplit(":", 1)[1]): leak for leak in leaks}
    recased_leak = by_line.get(207) or by_train_line.get(207)
    near_leak = by_line.get(209) or by_train_line.get(209)
    assert recased_leak is not None and recased_leak.exact and recased_leak.same_answer
    assert near_leak is not None and not near_leak.exact and 0.8 <= near_leak.similarity < 1
    assert result.report["leakage"] == {name: [
        {"row": leak.source, "train_row": leak.train_source, "exact": leak.exact,
         "similarity": round(leak.similarity, 3), "same_answer": leak.same_answer} for leak in result.leakage[name]]
        for name in ("validation", "test")}


def test_split_leakage_on_in_memory_splits():
    def row(text: str, answer: str, line: int) -> Conversation:
        return Conversation((Message("system", "Classify."), Message("user", text), Message("assistant", answer)),
                            f"d.jsonl:{line}")

    train = [row(BASE, "card_arrival", 1), row("How do I top up?", "top_up", 2)]
    validation = [row("how do I  TOP UP?", "top_up", 3), row("Is Apple Pay supported?", "apple_pay", 4)]
    test = [row(BASE.replace("home", "flat"), "card_arrival", 5), row("How do I top up?", "refund", 6)]
    leaks = split_leakage(train, validation, test)
    assert [(x.source, x.train_source, x.exact, x.same_answer) for x in leaks["validation"]] == [
        ("d.jsonl:3", "d.jsonl:2", True, True)]
    assert [(x.source, x.train_source, x.exact, x.same_answer) for x in leaks["test"]] == [
        ("d.jsonl:5", "d.jsonl:1", False, False), ("d.jsonl:6", "d.jsonl:2", True, False)]


def test_cli_split_and_bad_fractions(tmp_path):
    data = write(tmp_path / "d.jsonl", banking77(120))
    result = CliRunner().invoke(app, ["data", "split", str(data), "-o", str(tmp_path / "out"), "--fractions", "0.5,0.25,0.25"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"split {data} (120 rows): train ") and lines[0].endswith(f"-> {tmp_path / 'out'}")
    assert lines[-1].endswith(f"report: {tmp_path / 'out' / REPORT_NAME}")
    result = CliRunner().invoke(app, ["data", "split", str(data), "-o", str(tmp_path / "j"), "--json"])
    assert json.loads(result.output)["sizes"] == json.loads((tmp_path / "j" / REPORT_NAME).read_text())["sizes"]
    for bad in ("0.8,0.1", "0.8,0.1,0.2", "a,b,c", "1.2,-0.1,-0.1"):
        with pytest.raises(TunelabError, match="--fractions"):
            parse_fractions(bad)
    result = CliRunner().invoke(app, ["data", "split", str(data), "-o", str(tmp_path / "x"), "--fractions", "0.9,0.2,0"])
    assert isinstance(result.exception, TunelabError) and not (tmp_path / "x").exists()
