"""tunelab.evaluation.base_results: the base's results read back by a later evaluation, and only when they would
come out the same."""

from __future__ import annotations

import json
import logging

import torch

from tunelab.config import EvalConfig
from tunelab.evaluation import contenders
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.contenders import evaluate_run
from tunelab.evaluation.forgetting import ProbeItem
from tunelab.model.precision import choose_precision

FP32 = choose_precision("fp32")
ITEMS = [ProbeItem("k1", "knowledge", "What is the capital of France?", "Paris", "contains"),
         ProbeItem("a1", "arithmetic", "What is 2 + 3?", "5", "number")]


def test_a_key_changes_with_everything_the_result_depends_on(tiny_loaded, tmp_path):
    _, tokenizer = tiny_loaded
    reuse = BaseResults("weights-a", FP32, tmp_path)
    key = reuse.key("contender", tokenizer, prompts=[[1, 2, 3]], references=["x"])
    assert key == BaseResults("weights-a", FP32, tmp_path / "elsewhere").key(
        "contender", tokenizer, prompts=[[1, 2, 3]], references=["x"])  # where it is kept is not part of it
    others = {
        BaseResults("weights-b", FP32, tmp_path).key("contender", tokenizer, prompts=[[1, 2, 3]], references=["x"]),
        BaseResults("weights-a", choose_precision("bf16"), tmp_path).key("contender", tokenizer, prompts=[[1, 2, 3]],
                                                                         references=["x"]),
        reuse.key("forgetting", tokenizer, prompts=[[1, 2, 3]], references=["x"]),
        reuse.key("contender", tokenizer, prompts=[[1, 2, 4]], references=["x"]),
        reuse.key("contender", tokenizer, prompts=[[1, 2, 3]], references=["y"]),
    }
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another summation order
        others.add(reuse.key("contender", tokenizer, prompts=[[1, 2, 3]], references=["x"]))
    finally:
        torch.set_num_threads(threads)
    assert key not in others and len(others) == 6


def test_an_unreadable_result_is_a_miss_and_a_failed_store_only_warns(tmp_path, caplog):
    reuse = BaseResults("w", FP32, tmp_path / "results")
    assert reuse.get("k") is None
    reuse.put("k", {"ok": [True], "loss": 1.5})
    assert reuse.get("k") == {"ok": [True], "loss": 1.5}
    (tmp_path / "results" / "k.json").write_text('{"ok": [tr')  # half a file
    with caplog.at_level(logging.WARNING):
        assert reuse.get("k") is None
    assert "unreadable" in caplog.text
    (tmp_path / "blocked").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        BaseResults("w", FP32, tmp_path / "blocked").put("k", {"a": 1})
    assert "could not keep" in caplog.text


def test_a_second_evaluation_reads_the_base_back_and_computes_the_fine_tune(trained_run, tmp_path, monkeypatch):
    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows, train = result.data.split.test[:5], result.data.split.train
    cfg = EvalConfig(batch_size=3, few_shot=2)
    reuse = BaseResults("the tiny base", FP32, tmp_path)
    first = evaluate_run(model, tokenizer, rows, train, cfg, FP32, forgetting_items=ITEMS, reuse=reuse)
    assert not any(c.reused for c in first.contenders.values()) and not first.forgetting.base_reused
    assert len(list(tmp_path.glob("*.json"))) == 3  # two base contenders and the base's forgetting half

    ran = []
    real = contenders._run_contender
    monkeypatch.setattr(contenders, "_run_contender", lambda name, *a: ran.append(name) or real(name, *a))
    second = evaluate_run(model, tokenizer, rows, train, cfg, FP32, forgetting_items=ITEMS, reuse=reuse)
    assert ran == ["finetune"]
    for name in ("base_zero_shot", "base_few_shot"):
        assert second.contenders[name].reused
        assert (second.contenders[name].model_dump(exclude={"reused"})
                == first.contenders[name].model_dump(exclude={"reused"}))
    assert not second.contenders["finetune"].reused
    assert second.forgetting.base_reused
    assert second.forgetting.probe.base == first.forgetting.probe.base
    assert second.forgetting.general_text_loss.base == first.forgetting.general_text_loss.base
    assert second.comparisons["base_zero_shot"].model_dump() == first.comparisons["base_zero_shot"].model_dump()

    for path in tmp_path.glob("*.json"):  # files edited by hand: valid JSON, not a result
        path.write_text(json.dumps({"ok": 3, "loss": 1.0} if "loss" in json.loads(path.read_text()) else {"x": 1}))
    ran.clear()
    edited = evaluate_run(model, tokenizer, rows, train, cfg, FP32, forgetting_items=ITEMS, reuse=reuse)
    assert ran == ["finetune", "base_zero_shot", "base_few_shot"] and not edited.forgetting.base_reused
    assert edited.contenders["base_zero_shot"].predictions == first.contenders["base_zero_shot"].predictions

    ran.clear()
    other_rows = evaluate_run(model, tokenizer, rows[:4], train, cfg.model_copy(update={"forgetting_probe": False}),
                              FP32, reuse=reuse)
    assert ran == ["finetune", "base_zero_shot", "base_few_shot"]  # other rows: nothing to read back
    assert not any(c.reused for c in other_rows.contenders.values())


def test_tunelab_eval_twice_reads_the_base_back_unless_told_not_to(trained_run, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    args = ["eval", str(run), "--set", "eval.max_rows=4", "--set", "eval.forgetting_probe=false"]
    reused = []
    for extra in ([], [], ["--set", "eval.reuse_base=false"]):
        outcome = CliRunner().invoke(app, args + extra)
        assert outcome.exit_code == 0, outcome.output
        report = json.loads((run / "eval.json").read_text())
        reused.append({name: c["reused"] for name, c in report["contenders"].items()})
        said = (run / "report.md").read_text().count("read back: computed by an earlier evaluation")
        assert said == sum(reused[-1].values())  # the report says which rows were read back
    assert reused[0] == {"finetune": False, "base_zero_shot": False, "base_few_shot": False}
    assert reused[1] == {"finetune": False, "base_zero_shot": True, "base_few_shot": True}
    assert reused[2] == reused[0]
    assert len(list((tmp_path / "home" / "base-results").glob("*.json"))) == 2

