"""tunelab.training.auto: 'auto' hyperparameters, resolved from the data and explained."""

from __future__ import annotations

import json

import pytest

from tunelab.config import TrainConfig
from tunelab.training import auto


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
    from tunelab.training.recipe import train

    cfg = make_config(classification_csv, train={"epochs": "auto", "batch_size": "auto", "learning_rate": "auto"})
    result = train(cfg)
    saved = json.loads((result.run.path / "config.json").read_text())["train"]
    assert "auto" not in (saved["epochs"], saved["batch_size"], saved["learning_rate"])
    rows = len(result.data.train)
    assert saved["epochs"] == auto.choose_epochs(rows).value
    why = json.loads((result.run.path / "data.json").read_text())["hyperparameters"]
    assert set(why) == {"epochs", "batch_size", "learning_rate"} and all(v["why"] for v in why.values())


def test_auto_learning_rate_depends_on_the_method():
    from tunelab.training.auto import choose_learning_rate

    lora, full = choose_learning_rate(16, "lora"), choose_learning_rate(16, "full")
    assert lora.value == 1e-3 and full.value == 5e-5 and "full fine-tuning" in full.why
    assert choose_learning_rate(64, "full").value == 1e-4  # capped
    assert choose_learning_rate(16, "lora", rank=64).value == lora.value  # alpha/rank keeps the scale
    assert choose_learning_rate(16, "lora", rank=64, rslora=True).value == 5e-4  # rsLoRA's scale grows with sqrt(r)


# ---- batch size from memory (tunelab.training.memory)

GB = 10**9


def _estimate(model, tokens=40, trained=5, **kw):
    from tunelab.training.memory import estimate_training_memory

    return estimate_training_memory(model, tokens, trained, **kw)


def test_the_memory_estimate_grows_with_the_length_and_with_full_tuning(tiny_loaded):
    from tunelab.config import LoraConfig

    model, _ = tiny_loaded
    lora = _estimate(model, lora=LoraConfig(rank=4))
    assert lora.trainable == sum(4 * (m.in_features + m.out_features) for m in
                                 [m for n, m in model.named_modules() if n.endswith("_proj")])  # every linear but the head
    longer = _estimate(model, tokens=160, lora=LoraConfig(rank=4))
    assert longer.per_example > 4 * lora.per_example  # attention is quadratic in the length
    full = _estimate(model, tuning="full")
    assert full.trainable == sum(p.numel() for p in model.parameters())
    assert full.total(1) > lora.total(1) and full.fixed > lora.fixed
    assert _estimate(model, lora=LoraConfig(rank=4, target_modules=["q_proj", "v_proj"])).trainable < lora.trainable


def test_batch_falls_when_memory_is_small_and_the_reason_names_the_numbers(tiny_loaded):
    from tunelab.training.memory import Available

    model, _ = tiny_loaded
    est = _estimate(model)
    ample = auto.choose_batch_size(30, est, Available(100 * GB, "MemAvailable"))
    assert ample.value == 32 and "memory:" in ample.why and "fits" in ample.why
    # room for about 5 rows: the weights are loaded already, so they count as room
    free = int((est.fixed + 5.5 * est.per_example) / auto.MEMORY_FRACTION) - est.weights
    small = auto.choose_batch_size(30, est, Available(free, "MemAvailable"))
    assert small.value == 4  # 5 fit, a power of two: 4
    assert "-> 32" in small.why and "fits 5 in 70%" in small.why and "-> 4" in small.why
    assert "per example at 40 tokens" in small.why and "fixed" in small.why and "MemAvailable" in small.why


def test_not_even_batch_one_fitting_is_an_error_with_a_fix(tiny_loaded):
    from tunelab.errors import TunelabError
    from tunelab.training.memory import Available

    model, _ = tiny_loaded
    with pytest.raises(TunelabError) as err:
        auto.choose_batch_size(30, _estimate(model), Available(0, "MemAvailable"))
    assert "batch 1" in err.value.what and "max_length" in err.value.fix and "quantize_base" in err.value.fix


def test_resolve_fits_the_batch_to_the_memory_available(tiny_loaded, monkeypatch):
    from tunelab.training.memory import Available

    model, _ = tiny_loaded
    train = TrainConfig(epochs=1, batch_size="auto", learning_rate="auto")
    est = _estimate(model, tokens=64, trained=6)
    free = int((est.fixed + 2.5 * est.per_example) / auto.MEMORY_FRACTION) - est.weights
    monkeypatch.setattr(auto, "available_memory", lambda device: Available(free, "MemAvailable"))
    resolved, choices = auto.resolve(train, rows=600, mean_tokens=30, model=model, max_tokens=64, max_trained_tokens=6)
    assert resolved.batch_size == 2 and "fits 2" in choices["batch_size"].why
    assert resolved.learning_rate == auto.choose_learning_rate(2).value  # the rate follows the fitted batch

    # a batch set in the config is kept, with a warning when it may not fit
    resolved, choices = auto.resolve(train.model_copy(update={"batch_size": 16}), rows=600, mean_tokens=30,
                                     model=model, max_tokens=64, max_trained_tokens=6)
    assert resolved.batch_size == 16 and "WARNING" in choices["batch_size"].why
    resolved, choices = auto.resolve(train.model_copy(update={"batch_size": 2}), rows=600, mean_tokens=30,
                                     model=model, max_tokens=64, max_trained_tokens=6)
    assert choices["batch_size"].why == "set in the config"

    # ample memory: the speed target as before
    monkeypatch.setattr(auto, "available_memory", lambda device: Available(100 * GB, "MemAvailable"))
    resolved, _ = auto.resolve(train, rows=600, mean_tokens=30, model=model, max_tokens=64, max_trained_tokens=6)
    assert resolved.batch_size == auto.choose_batch_size(30).value == 32


def test_available_memory_on_this_machine_is_positive():
    from tunelab.training.memory import available_memory

    found = available_memory("cpu")
    assert found is None or (found.bytes > 0 and found.source)


def test_sharding_divides_the_fixed_memory_but_not_the_activations(tiny_loaded):
    from tunelab.training.memory import estimate_training_memory

    model, _ = tiny_loaded
    one = estimate_training_memory(model, 40, 5, tuning="full")
    two = estimate_training_memory(model, 40, 5, tuning="full", shards=2)
    assert two.training_state == one.training_state // 2
    layers = model.config.num_hidden_layers
    # A share, plus the two layers gathered whole (never more than the whole weights)
    assert two.weights == min(one.weights, one.weights // 2 + 2 * one.weights // layers)
    assert two.per_example == one.per_example  # each process still computes its own rows
