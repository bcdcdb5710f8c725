"""Training methods as branches of one loop: full fine-tuning, DPO, packing, schedules, metrics export."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from helpers import pairs_file
from tunelab.rundir import load_run
from tunelab.training.recipe import train


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _logits(model, tokenizer, text: str = "<|im_start|>user\nwhere is my card<|im_end|>\n") -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_fine_tuning_trains_every_weight_and_reloads_identically(make_config, classification_csv):
    cfg = make_config(classification_csv, train={"learning_rate": 2e-2, "epochs": 4, "eval_every": 0}).model_copy(
        update={"tuning": "full"})
    result = train(cfg)
    model = result.model
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    steps = _steps(result.run.path)
    assert sum(r["loss"] for r in steps[-3:]) / 3 < 0.7 * sum(r["loss"] for r in steps[:3]) / 3
    assert (result.run.path / "model" / "model.safetensors").is_file()
    assert not (result.run.path / "adapter").exists()
    model.eval()
    reloaded, tokenizer, _ = load_run_unfinished(result.run.path)
    assert torch.equal(_logits(model, tokenizer), _logits(reloaded, tokenizer))


def load_run_unfinished(path: Path):
    """load_run needs a finished run (manifest); train() alone does not write one, so mark it whole here."""
    (path / "manifest.json").write_text("{}")
    return load_run(path)


def test_dpo_run_raises_the_reward_margin_and_reloads_identically(make_config, tmp_path):
    cfg = make_config(pairs_file(tmp_path), data={"format": "chosen_rejected"},
                      train={"learning_rate": 1e-2, "epochs": 8, "batch_size": 4, "eval_every": 4, "val_rows": 4})
    cfg = cfg.model_copy(update={"objective": "dpo"})
    result = train(cfg)
    steps = _steps(result.run.path)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["reward_margin"] > 0.1 and steps[-1]["loss"] < 0.6
    validations = [r for r in map(json.loads, (result.run.path / "metrics.jsonl").read_text().splitlines())
                   if "val_reward_margin" in r]
    assert validations[-1]["val_reward_margin"] > validations[0]["val_reward_margin"]
    assert (result.run.path / "adapter" / "adapter_model.safetensors").is_file()
    result.model.eval()
    reloaded, tokenizer, _ = load_run_unfinished(result.run.path)
    assert torch.equal(_logits(result.model, tokenizer), _logits(reloaded, tokenizer))


def test_dpo_with_full_tuning_is_refused(make_config, tmp_path):
    from tunelab.errors import TunelabError

    cfg = make_config(pairs_file(tmp_path), data={"format": "chosen_rejected"})
    with pytest.raises(TunelabError, match="tuning: lora"):
        train(cfg.model_copy(update={"objective": "dpo", "tuning": "full"}))


def test_packed_training_follows_the_unpacked_loss_curve(make_config, classification_csv):
    """Packing changes the tensors, not the examples of a step: the losses of every step agree."""
    base = dict(learning_rate=1e-2, epochs=2, batch_size=8, eval_every=0)
    plain = train(make_config(classification_csv, train=base))
    packed = train(make_config(classification_csv, train={**base, "packing": True, "pack_length": 48}))
    a, b = _steps(plain.run.path), _steps(packed.run.path)
    assert [r["examples"] for r in a] == [r["examples"] for r in b]
    assert [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)


def test_linear_schedule_and_per_step_metrics(make_config, classification_csv):
    cfg = make_config(classification_csv, train={"schedule": "linear", "warmup_ratio": 0.0, "epochs": 2,
                                                 "eval_every": 3})
    result = train(cfg)
    steps = _steps(result.run.path)
    lrs = [r["lr"] for r in steps]
    peak = cfg.train.learning_rate
    n = len(steps)
    assert lrs == pytest.approx([peak * (1 - (i + 1) / n) for i in range(n)], rel=1e-6, abs=1e-12)
    for r in steps:
        assert r["trained_tokens"] > 0 and r["peak_memory_mb"] > 0 and r["tokens"] >= r["trained_tokens"]
    validated = [r for r in steps if "val_loss" in r]
    assert validated and all(0.0 <= r["val_token_accuracy"] <= 1.0 for r in validated)


def test_report_to_sends_every_step_to_the_sink(make_config, classification_csv, monkeypatch):
    calls: dict[str, list] = {"metrics": [], "params": [], "ended": []}
    fake = types.ModuleType("mlflow")
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    fake.start_run = lambda run_name: None
    fake.log_params = lambda params: calls["params"].append(params)
    fake.log_metrics = lambda values, step: calls["metrics"].append((step, values))
    fake.end_run = lambda: calls["ended"].append(True)
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    result = train(make_config(classification_csv, train={"report_to": ["mlflow"]}))
    steps = _steps(result.run.path)
    assert [s for s, _ in calls["metrics"]] == [r["step"] for r in steps]
    assert calls["metrics"][0][1]["loss"] == pytest.approx(steps[0]["loss"])
    assert calls["params"][0]["train.report_to"] == "['mlflow']" and calls["ended"] == [True]


def test_report_to_a_missing_package_is_a_clear_error_before_training(make_config, classification_csv, monkeypatch):
    from tunelab.errors import TunelabError

    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec raises ValueError for None entries: not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TunelabError, match="pip install wandb"):
        train(make_config(classification_csv, train={"report_to": ["wandb"]}))
