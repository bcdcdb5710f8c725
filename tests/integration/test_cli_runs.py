"""The CLI verbs over a real (tiny) run, in a subprocess or in process: user mistakes found while setting up a run
exit 2 with one line and no traceback; `train --json` then `chat` answer as the run loaded back does."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from helpers import assert_user_error, classification_rows, cli, write_config, write_csv
from tunelab.cli import app
from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.evaluation.generate import generate
from tunelab.model.precision import choose_precision
from tunelab.rundir import load_run


def test_csv_without_the_named_column(tmp_path, tiny_model_dir):
    data = write_csv(tmp_path / "d.csv", classification_rows(), header=("text", "category"))
    cfg = write_config(tmp_path / "run.yaml", str(tiny_model_dir), data, tmp_path / "runs", output_column="label")
    proc = cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, f"{data}:1", "column 'label' not found", "category", "output_column")
    assert not (tmp_path / "runs").exists()  # nothing written before the data is validated


def test_empty_data_file(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.csv"
    data.write_text("text,label\n", encoding="utf-8")
    cfg = write_config(tmp_path / "run.yaml", str(tiny_model_dir), data, tmp_path / "runs")
    proc = cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, str(data), "no examples")


def test_unknown_model(tmp_path, classification_csv):
    cfg = write_config(tmp_path / "run.yaml", "no-such-model", classification_csv, tmp_path / "runs")
    proc = cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "unknown model 'no-such-model'", "fix:")


def test_train_json_and_chat_in_process(tmp_path, tiny_model_dir, classification_csv):
    cfg = write_config(tmp_path / "run.yaml", str(tiny_model_dir), classification_csv, tmp_path / "runs")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(cfg), "--json", "--set", "train.epochs=0.25", "--set", "eval.max_rows=2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "manifest.json").is_file()
    assert summary["task"] == "classification" and summary["test_rows"] == 2
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 0.25
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2  # 0.25 of ceil(59 / 8) = 8 micro-batches

    chat = runner.invoke(app, ["chat", str(run_dir), "where is my card", "--max-new-tokens", "3"])
    assert chat.exit_code == 0, chat.output
    # the same answer as the run loaded back, with the run's system prompt (none here) and template
    precision = choose_precision("auto")
    model, tokenizer, _ = load_run(run_dir, dtype=precision.weights_dtype)
    prompt = render_prompt(tokenizer, [Message("user", "where is my card")])
    (expected,) = generate(model, tokenizer, [prompt], max_new_tokens=3, batch_size=1, precision=precision).generations
    assert chat.stdout == expected.text + "\n"
