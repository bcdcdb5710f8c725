"""The evaluation report: a fake run directory in, report.html and report.md out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_data
from tunelab.evaluation.report import fmt_p, plot_confusion, write_report
from tunelab.evaluation.result import Confusion

HOSTILE = "<script>alert(1)</script>"
LABELS = ["card_arrival", "exchange_rate", "lost_phone", "top_up", "refund"]
SECTIONS = ["Verdict", "Summary", "Comparisons", "Plots", "Training and validation loss", "Primary metric by contender",
            "Confusion matrix (fine-tune)", "Lengths", "Wins and losses", "Forgetting", "Config"]


def contender(acc: float, predictions: list[str], confusion: bool = False) -> dict:
    c = {
        "metrics": {"accuracy": acc, "macro_f1": acc - 0.01, "loss": 0.31, "perplexity": 1.36},
        "ci": {"accuracy": [max(0.0, acc - 0.03), min(1.0, acc + 0.03)], "macro_f1": [acc - 0.05, acc + 0.02]},
        "prompt_tokens_mean": 33.0 if confusion else 412.5,
        "ms_per_request": 64.0,
        "seconds": 32.1,
        "predictions": predictions,
        "correct": [p in LABELS for p in predictions],
        "scores": [float(p in LABELS) for p in predictions],
    }
    if confusion:
        c["confusion"] = {"labels": LABELS, "matrix": [[5 if i == j else (1 if j == i + 1 else 0) for j in range(5)]
                                                      for i in range(5)]}
    return c


def comparison(baseline: float, p: float, wins: int, losses: int) -> dict:
    example = {"source": "test.csv:12", "prompt": f"my card {HOSTILE}", "reference": "card_arrival",
               "finetune": "card_arrival", "baseline": HOSTILE}
    return {"metric": "accuracy", "finetune": 0.862, "baseline": baseline, "delta": 0.862 - baseline,
            "delta_ci": [0.82 - baseline, 0.89 - baseline], "test": "mcnemar", "p_value": p, "significant": p < 0.05,
            "wins": wins, "losses": losses, "win_examples": [example], "loss_examples": []}


EVAL = {
    "format": "tunelab-eval/2",
    "task": "classification",
    "metric": "accuracy",
    "metric_why": "5 distinct answers over 30 rows: a label set",
    "test_rows": 30,
    "data": "the run's own test split",
    "contenders": {
        "finetune": contender(0.862, ["card_arrival", "refund", "top_up"] * 10, confusion=True),
        "base_zero_shot": contender(0.004, [HOSTILE, "I think the answer is refund", "?"] * 10),
        "base_few_shot": contender(0.7, ["refund", "top_up", "lost_phone"] * 10),
    },
    "comparisons": {"base_zero_shot": comparison(0.004, 1.2e-90, 430, 1),
                    "base_few_shot": comparison(0.7, 0.0342, 40, 22)},
    "forgetting": {
        "probe_items": 100, "general_text_tokens": 2600,
        "probe": {"base": 0.41, "finetune": 0.39, "delta": -0.02},
        "general_text_loss": {"base": 2.91, "finetune": 2.95, "delta": 0.04},
        "threshold": 0.05, "loss_tolerance": 0.1, "flagged": False,
        "why": "No sign of forgetting: probe score fell 0.02 (0.41 -> 0.39, threshold 0.05).",
        "categories": {"knowledge": {"items": 25, "base": 0.5, "finetune": 0.44, "delta": -0.06}},
        "items": [{"id": "knowledge-01", "category": "knowledge", "base_ok": True, "finetune_ok": False}],
    },
}
DATA = run_data(path="/data/intents.csv", base_model={"spec": "smollm2-135m-instruct", "path": "/models/smollm2",
                                                     "weights": "0123456789abcdef"},
                lengths={"tokens": [30 + i % 17 for i in range(200)], "trained_tokens": [3 + i % 4 for i in range(200)]})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "intents-20261122-101500"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "smollm2-135m-instruct", "name": "intents", "tuning": "lora",
                                                 "objective": "sft", "lora": {"rank": 8, "alpha": 16},
                                                 "data": {"path": f"/data/{HOSTILE}.csv"}}))
    (run / "data.json").write_text(json.dumps(DATA))
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} | ({"val_loss": 3.2 / s} if s % 5 == 0 else {})
             for s in range(1, 21)]
    lines.append({"step": 20, "val_loss": 0.17})  # the final validation: no train loss
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 21, "lo')
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


def test_report_has_every_section_and_plot(run_dir: Path):
    html_path, md_path = write_report(run_dir)
    assert html_path == run_dir / "report.html" and md_path == run_dir / "report.md"
    page = html_path.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert re.search(rf"<h[1-4]>{re.escape(heading)}", page), heading
    assert page.count('<img src="data:image/png;base64,') >= 5  # loss, bars, confusion, two length histograms
    assert "intents-20261122-101500" in page and "smollm2-135m-instruct" in page and "ab12cd34ef56" in page
    assert "LoRA (rank 8, alpha 16), SFT" in page


def test_report_is_self_contained(run_dir: Path):
    page = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert not re.search(r"<(script|link)\b", page)
    assert "http://" not in page and "https://" not in page


def test_report_escapes_everything_from_the_data(run_dir: Path):
    html_path, md_path = write_report(run_dir)
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        assert HOSTILE not in text
    page = html_path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # in the examples and the config dump


def test_report_verdict_and_p_values(run_dir: Path):
    page = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert "1.2e-90" in page and "0.034" in page
    assert "significantly beats base zero-shot on accuracy" in page
    assert "Forgetting check (not flagged)" in page
    assert "430 wins, 1 losses" in page
    assert "knowledge-01" in page  # a probe item the fine-tune lost


def test_markdown_has_a_row_per_contender_and_comparison(run_dir: Path):
    md = write_report(run_dir)[1].read_text(encoding="utf-8")
    for heading in ("## Verdict", "## Summary", "## Comparisons", "## Forgetting"):
        assert heading in md
    for name in ("fine-tune", "base zero-shot", "base few-shot"):
        assert re.search(rf"^\| {name} \| [0-9.]+ \[", md, re.MULTILINE), name
    assert re.search(r"^\| base few-shot \| accuracy \| 0\.862 \| 0\.700 \| \+0\.162 .*\| 0\.034 \|", md, re.MULTILINE)
    assert "| probe score (100 items) | 0.410 | 0.390 | -0.020 |" in md
    assert "data:image" not in md


def test_no_temporary_files_are_left(run_dir: Path):
    before = {p.name for p in run_dir.iterdir()}
    write_report(run_dir)
    write_report(run_dir)  # a second report replaces the first
    assert {p.name for p in run_dir.iterdir()} == before | {"report.html", "report.md"}


def test_a_run_without_eval_json_still_gets_a_report(run_dir: Path):
    (run_dir / "eval.json").unlink()
    page = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert "No evaluation yet" in page and "eval.json is missing" in page
    assert page.count('<img src="data:image/png;base64,') == 2  # training loss and training lengths
    assert "The forgetting check did not run" in page


def test_an_empty_or_broken_run_dir_still_gets_a_report(tmp_path: Path):
    (tmp_path / "eval.json").write_text("{not json")
    html_path, md_path = write_report(tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert "eval.json could not be read" in page and "metrics.jsonl is missing" in page
    assert "No losses logged" in page and "config.json is missing" in page
    assert md_path.is_file()


def test_an_eval_json_of_another_format_is_named_not_guessed_at(run_dir: Path):
    old = {**EVAL, "format": "tunelab-eval/1", "summary": {}}  # what tunelab wrote before its results were typed
    (run_dir / "eval.json").write_text(json.dumps(old))
    page = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert "eval.json could not be read" in page and "tunelab-eval/2" in page
    assert "No evaluation yet" in page  # the verdict does not guess from a shape it does not know


def test_confusion_with_many_labels_shows_the_most_confused():
    n = 100
    labels = [f"label_{i}" for i in range(n)]
    matrix = [[10 if i == j else 0 for j in range(n)] for i in range(n)]
    matrix[3][7] = matrix[50][51] = 4
    img, caption = plot_confusion(Confusion(labels=labels, matrix=matrix))
    assert img and img.startswith('<img src="data:image/png;base64,')
    assert "40 labels most involved in confusions, of 100" in caption


@pytest.mark.parametrize(("p", "shown"), [(1.2e-90, "1.2e-90"), (0.0342, "0.034"), (0.5, "0.500"), (None, "—")])
def test_p_values_are_formatted(p, shown):
    assert fmt_p(p) == shown
