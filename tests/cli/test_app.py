"""tunelab.cli (app, run, render): user mistakes exit 2 with one line and no traceback; the verbs work end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import assert_user_error, classification_rows, cli, write_csv
from tunelab.cli import app
from tunelab.cli.run import parse_sets
from tunelab.errors import TunelabError


def test_missing_config_file(tmp_path):
    proc = cli("train", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert_user_error(proc, "config file not found", "nope.yaml", "fix:")


def test_bad_set_is_a_user_error():
    assert parse_sets(["lora.rank=32", "train.learning_rate=1e-3", "eval.max_rows=null"]) == {
        "lora.rank": 32, "train.learning_rate": "1e-3", "eval.max_rows": None,
    }
    with pytest.raises(TunelabError, match="KEY=VALUE"):
        parse_sets(["lora.rank"])


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


def test_eval_command_on_a_moved_run_names_where_the_run_is_now(trained_run, tmp_path):
    """A run copied elsewhere and evaluated again: its summary names the copy, not where it was trained."""
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(trained_run.path, run)
    result = CliRunner().invoke(app, ["eval", str(run), "--set", "eval.max_rows=4",
                                      "--set", "eval.forgetting_probe=false", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(run.resolve()) != json.loads((trained_run.path / "manifest.json").read_text())[
        "summary"]["run_dir"]
    assert json.loads((run / "manifest.json").read_text())["summary"]["run_dir"] == str(run.resolve())
