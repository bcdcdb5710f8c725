"""tunelab.training.recipe: the loop learns, its schedule and its records (whole runs: tests/integration/)."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.rundir import RunDir


def metrics(run_path):
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_memorizable_set(trained_run):
    records = metrics(trained_run.path)
    steps = [r for r in records if "loss" in r]
    data = RunDir(trained_run.path).data()
    t = trained_run.cfg.train
    expected_steps = math.ceil(data.train_rows_used / t.batch_size) * int(t.epochs)
    assert [r["step"] for r in steps] == list(range(1, expected_steps + 1))
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert first == pytest.approx(math.log(400), abs=1.5)  # untrained: about uniform over the vocab
    assert last < first - 1.0, (first, last)
    # the mean over the last epoch is far below the first epoch's
    per_epoch = expected_steps // int(t.epochs)
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    assert mean(steps[-per_epoch:]) < mean(steps[:per_epoch]) - 0.8
    # schedule: warmup then cosine decay to 0; clipping reported
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert max(r["lr"] for r in steps) == pytest.approx(t.learning_rate, rel=0.05)
    assert all(r["grad_norm"] is not None and r["tokens"] > 0 for r in steps)
    # final validation loss recorded last and returned in the summary
    assert "val_loss" in records[-1] and records[-1]["step"] == expected_steps
    assert trained_run.summary.validation_loss == pytest.approx(records[-1]["val_loss"])
    assert records[-1]["val_loss"] < first


def test_a_loss_that_is_not_a_number_stops_the_run_before_the_optimizer_takes_it(tiny_model_dir, tmp_path, monkeypatch):
    """A NaN loss (broken kernels, a stale compiled cache, a learning rate that blew up) used to train on for every
    step, writing NaN into the adapter; it now stops at that step and says what to try."""
    from tests.helpers import classification_rows, make_run_config, write_csv

    from tunelab.errors import TunelabError
    from tunelab.io import MANIFEST
    from tunelab.training import recipe

    real = recipe.backward_on
    calls = []

    def nan_on_second(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        calls.append(1)
        return (float("nan") if len(calls) == 2 else loss, *rest)

    monkeypatch.setattr(recipe, "backward_on", nan_on_second)
    csv = write_csv(tmp_path / "data.csv", classification_rows())
    cfg = make_run_config(tiny_model_dir, csv, tmp_path / "runs", train={"batch_size": 2})
    with pytest.raises(TunelabError) as info:
        recipe.train(cfg)
    assert "the training loss is nan at step 2 of" in info.value.what and "model.kernels=reference" in info.value.fix
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / MANIFEST).exists()  # not a whole run
