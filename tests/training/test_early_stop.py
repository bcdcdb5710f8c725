"""Early stopping: stops on a plateau, keeps and marks the best checkpoint, survives pruning."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tunelab.training.checkpoint import best_checkpoint, complete_checkpoints
from tunelab.training.early_stop import EarlyStopping
from tunelab.training.recipe import train


def test_update_and_should_stop():
    e = EarlyStopping(patience=2, min_delta=0.01)
    assert e.update(50, 0.36) and e.update(100, 0.13)
    assert not e.update(150, 0.125)  # within min_delta: not an improvement
    assert not e.should_stop
    assert not e.update(200, 0.15)
    assert e.should_stop and (e.best, e.best_step, e.bad) == (0.13, 100, 2)


def test_replay_rebuilds_the_state_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 1.0, "val_loss": 0.5}, {"step": 2, "loss": 0.9}, {"step": 3, "loss": 0.8,
               "val_loss": 0.6}, {"step": 4, "loss": 0.7, "val_loss": 0.4}, {"step": 4, "val_loss": 0.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    e = EarlyStopping.replay(3, 0.0, path, up_to_step=3)
    assert (e.best, e.best_step, e.bad) == (0.5, 1, 1)
    assert EarlyStopping.replay(3, 0.0, path, up_to_step=4).best_step == 4  # the final val-only line is skipped


def _logged(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_stops_on_a_planted_plateau_and_keeps_the_best(classification_csv, make_config):
    # lr 1e-12: the validation loss cannot fall by min_delta, so step 1 stays the best.
    cfg = make_config(classification_csv, train={
        "epochs": 5, "batch_size": 8, "learning_rate": 1e-12, "eval_every": 1, "early_stopping_patience": 2,
        "early_stopping_min_delta": 1e-6, "keep_checkpoints": 1, "val_rows": 8})
    result = train(cfg)
    steps = [r["step"] for r in _logged(result.run.path) if "loss" in r]
    assert steps == [1, 2, 3]  # stopped after 2 validations without improvement, long before the end
    best = best_checkpoint(result.run.path)
    assert best is not None and best.name == "step-0000001" and best in complete_checkpoints(result.run.path)
    # the adapter kept is the best checkpoint's
    saved = load_file(best / "trainable.safetensors")
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in saved.items())


def test_without_a_plateau_it_runs_to_the_end_and_marks_the_lowest_loss(classification_csv, make_config):
    cfg = make_config(classification_csv, train={
        "epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "eval_every": 2, "early_stopping_patience": 50,
        "keep_checkpoints": 1, "val_rows": 8})
    result = train(cfg)
    logged = _logged(result.run.path)
    vals = [(r["val_loss"], r["step"]) for r in logged if "loss" in r and "val_loss" in r]
    from tunelab.training.setup import epoch_stream

    planned = len(epoch_stream(result.data.train, 8, 3, seed=cfg.train.seed))
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, planned + 1))  # no early stop
    assert best_checkpoint(result.run.path).name == f"step-{min(vals)[1]:07d}"
