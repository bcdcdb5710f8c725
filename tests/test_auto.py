"""tunelab.train.auto: 'auto' hyperparameters, resolved from the data and explained."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from tunelab.config import TrainConfig
from tunelab.train import auto


@pytest.mark.parametrize(("rows", "epochs"), [(100, 25), (500, 6), (1_000, 3), (6_000, 3), (10_000, 2), (50_000, 1)])
def test_epochs_bring_example_passes_into_range(rows, epochs):
    choice = auto.choose_epochs(rows)
    assert choice.value == epochs
    assert f"{rows:,} rows" in choice.why


@pytest.mark.parametrize(("mean_tokens", "batch"), [(36, 16), (30, 32), (10, 32), (100, 8), (700, 1), (5000, 1)])
def test_batch_size_aims_at_tokens_per_micro_batch(mean_tokens, batch):
    assert auto.choose_batch_size(mean_tokens).value == batch


def test_learning_rate_scales_with_batch_and_is_capped():
    assert auto.choose_learning_rate(16).value == pytest.approx(1e-3)
    assert auto.choose_learning_rate(4).value == pytest.approx(5e-4)
    assert auto.choose_learning_rate(256).value == pytest.approx(2e-3)


def test_resolve_keeps_explicit_values_and_says_so():
    train = TrainConfig(epochs="auto", batch_size=8, learning_rate="auto")
    resolved, choices = auto.resolve(train, rows=6_000, mean_tokens=36)
    assert (resolved.epochs, resolved.batch_size) == (3.0, 8)
    assert resolved.learning_rate == pytest.approx(1e-3 * (8 / 16) ** 0.5)
    assert choices["batch_size"].why == "set in the config"
    assert "example passes" in choices["epochs"].why and "sqrt" in choices["learning_rate"].why


def test_config_rejects_non_positive_and_unknown_words():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(batch_size="big")


def test_a_run_with_auto_records_the_resolved_values_and_why(classification_csv, make_config):
    from tunelab.train.sft import train

    cfg = make_config(classification_csv, train={"epochs": "auto", "batch_size": "auto", "learning_rate": "auto"})
    result = train(cfg, Console(stderr=True, quiet=True))
    saved = json.loads((result.run.path / "config.json").read_text())["train"]
    assert "auto" not in (saved["epochs"], saved["batch_size"], saved["learning_rate"])
    rows = len(result.data.train)
    assert saved["epochs"] == auto.choose_epochs(rows).value
    why = json.loads((result.run.path / "data.json").read_text())["hyperparameters"]
    assert set(why) == {"epochs", "batch_size", "learning_rate"} and all(v["why"] for v in why.values())


def test_auto_learning_rate_depends_on_the_method():
    from tunelab.train.auto import choose_learning_rate

    lora, full = choose_learning_rate(16, "lora"), choose_learning_rate(16, "full")
    assert lora.value == 1e-3 and full.value == 5e-5 and "full fine-tuning" in full.why
    assert choose_learning_rate(64, "full").value == 1e-4  # capped
    assert choose_learning_rate(16, "lora", rank=64).value == lora.value  # alpha/rank keeps the scale
    assert choose_learning_rate(16, "lora", rank=64, rslora=True).value == 5e-4  # rsLoRA's scale grows with sqrt(r)
