"""tunelab.cli (app, run, render): user mistakes exit 2 with one line and no traceback; the verbs work end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.cli.run import parse_sets
from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.errors import TunelabError
from tunelab.evaluation.generate import generate
from tunelab.rundir import load_run
from tunelab.model.precision import choose_precision

from helpers import classification_rows, write_csv


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_config(path: Path, model: str, data: Path, output_dir: Path, **data_keys: str) -> Path:
    extra = "".join(f"  {k}: {v}\n" for k, v in data_keys.items())
    path.write_text(
        f"model: {model}\nname: cli\noutput_dir: {output_dir}\n"
        f"data:\n  path: {data}\n  format: csv\n{extra}"
        "train: {precision: fp32, batch_size: 8, epochs: 1, learning_rate: 1.0e-3, val_rows: 4}\n"
        "eval: {max_rows: 4, batch_size: 4}\n",
        encoding="utf-8",
    )
    return path


def test_missing_config_file(tmp_path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert_user_error(proc, "config file not found", "nope.yaml", "fix:")


def test_csv_without_the_named_column(tmp_path, tiny_model_dir):
    data = write_csv(tmp_path / "d.csv", classification_rows(), header=("text", "category"))
    cfg = write_config(tmp_path / "run.yaml", str(tiny_model_dir), data, tmp_path / "runs", output_column="label")
    proc = run_cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, f"{data}:1", "column 'label' not found", "category", "output_column")
    assert not (tmp_path / "runs").exists()  # nothing written before the data is validated


def test_empty_data_file(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.csv"
    data.write_text("text,label\n", encoding="utf-8")
    cfg = write_config(tmp_path / "run.yaml", str(tiny_model_dir), data, tmp_path / "runs")
    proc = run_cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, str(data), "no examples")


def test_unknown_model(tmp_path, classification_csv):
    cfg = write_config(tmp_path / "run.yaml", "no-such-model", classification_csv, tmp_path / "runs")
    proc = run_cli("train", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "unknown model 'no-such-model'", "fix:")


def test_bad_set_is_a_user_error():
    assert parse_sets(["lora.rank=32", "train.learning_rate=1e-3", "eval.max_rows=null"]) == {
        "lora.rank": 32, "train.learning_rate": "1e-3", "eval.max_rows": None,
    }
    with pytest.raises(TunelabError, match="KEY=VALUE"):
        parse_sets(["lora.rank"])


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


def test_summary_table(trained_run, capsys, monkeypatch):
    from tunelab.cli.render import print_summary

    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside table cells
    print_summary(trained_run.summary)
    out = capsys.readouterr().out
    summary = trained_run.summary
    assert f"{summary.test_rows} held-out test rows" in out
    assert "base zero-shot" in out and "base few-shot" in out and "fine-tune" in out
    assert f"{100 * summary.contenders['finetune'].value:.1f}%" in out
    assert "forgetting check" in out
    assert summary.run_dir[:20] in out


def test_eval_command_evaluates_a_run_on_another_file_beside_its_own(trained_run, tmp_path):
    """tunelab eval RUN_DIR --data FILE: all three contenders on FILE's rows, written under evals/NAME/; the run's
    held-out eval.json (what the gate reads), its report and its summary stay exactly as they were."""
    import hashlib
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    held_out = {name: (run / name).read_bytes() for name in ("eval.json", "report.html", "report.md")}
    summary_before = json.loads((run / "manifest.json").read_text())["summary"]
    data = write_csv(tmp_path / "more.csv", classification_rows()[::5])  # 15 rows, every label
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--set", "eval.max_rows=6",
                                      "--set", "eval.forgetting_probe=false", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    name = f"more-{hashlib.sha256(data.read_bytes()).hexdigest()[:12]}"
    folder = run / "evals" / name
    report = json.loads((folder / "eval.json").read_text())
    assert report["data"] == str(data.resolve()) and report["test_rows"] == 6 == summary["test_rows"]
    assert set(report["contenders"]) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert report["forgetting"] is None
    assert (folder / "report.html").is_file() and (folder / "report.md").is_file()
    assert {name: (run / name).read_bytes() for name in held_out} == held_out  # untouched
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["evaluations"] == {"held-out": "eval.json", name: f"evals/{name}/eval.json"}
    assert manifest["summary"] == summary_before
    for rel in ("eval.json", f"evals/{name}/eval.json", f"evals/{name}/report.html"):
        assert manifest["files"][rel]["sha256"] == hashlib.sha256((run / rel).read_bytes()).hexdigest()
    bad = CliRunner().invoke(app, ["eval", str(run), "--set", "train.epochs=2"])
    assert bad.exit_code != 0 and "only takes eval.* keys" in str(bad.exception)
