"""A create request -> the RunConfig a job trains with, and what a run's files become in OpenAI's objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.service.jobs import CreateJobRequest, check_tunelab_keys, model_name, run_config
from tunelab.service.store import Job
from tunelab.service.worker import metrics_csv, metrics_data, metrics_message, resolved_method, step_records


def job(**fields) -> Job:
    request = CreateJobRequest.model_validate({"model": "base", "training_file": "file-x", **fields})
    return Job(id="ftjob-" + "a" * 24, seed=request.seed or 0, method=request.resolved_method().model_dump(
        exclude_none=True), tunelab=request.tunelab or {}, model=request.model)


def test_hyperparameters_and_extras_become_the_run_config(tmp_path: Path) -> None:
    j = job(seed=5, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
        tunelab={"lora": {"rank": 8}, "train": {"checkpoint_every": 7}})
    cfg = run_config(j, tmp_path / "file-x", tmp_path / "out", "smollm2-135m-instruct", checkpoint_every=50)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate_multiplier) == (2, 4, 0.5)
    assert cfg.train.seed == 5 and cfg.train.checkpoint_every == 7 and cfg.lora.rank == 8
    assert cfg.train.learning_rate == "auto" and cfg.objective == "sft" and cfg.name == j.id
    assert cfg.data.path == tmp_path / "file-x" and cfg.model.name == "smollm2-135m-instruct"
    default = run_config(job(), tmp_path / "f", tmp_path / "o", "base", checkpoint_every=50)
    assert default.train.epochs == "auto" and default.train.checkpoint_every == 50


def test_the_deprecated_top_level_hyperparameters_and_dpo(tmp_path: Path) -> None:
    old = job(hyperparameters={"n_epochs": 4})
    assert old.method == {"type": "supervised", "supervised": {"hyperparameters": {
        "batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": 4}}}
    dpo = run_config(job(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}), tmp_path / "f",
                     tmp_path / "o", "base", 50)
    assert dpo.objective == "dpo" and dpo.data.format == "dpo" and dpo.dpo.beta == 0.2


def test_api_owned_and_unknown_keys_are_refused_by_name(tmp_path: Path) -> None:
    for extra, fragment in [({"train": {"seed": 1}}, "tunelab.train.seed"), ({"output_dir": "/etc"}, "output_dir"),
                            ({"data": {"path": "/etc/passwd"}}, "data.path"), ({"model": "other"}, "tunelab.model")]:
        with pytest.raises(TunelabError, match=fragment.replace(".", r"\.")):
            check_tunelab_keys(extra)
    with pytest.raises(TunelabError, match="rnak"):
        run_config(job(tunelab={"lora": {"rnak": 2}}), tmp_path / "f", tmp_path / "o", "base", 50)


def test_model_names_follow_openais_pattern() -> None:
    assert model_name("smollm2-135m-instruct", "support", "bank", "ftjob-abc") == "ft:smollm2-135m-instruct:support:bank:abc"
    assert model_name("/models/tiny-llama", "p", None, "ftjob-abc") == "ft:tiny-llama:p::abc"


def test_a_runs_metrics_become_events_the_csv_and_resolved_hyperparameters(tmp_path: Path) -> None:
    lines = [{"step": 1, "total_steps": 2, "loss": 2.0, "tokens": 10, "seconds": 0.1},
             {"step": 2, "total_steps": 2, "loss": 1.5, "tokens": 12, "seconds": 0.1},
             {"step": 2, "val_loss": 1.7, "val_token_accuracy": 0.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo')  # a killed run's half line
    records = step_records(path)
    assert sorted(records) == [1, 2]
    data = metrics_data(records[2])
    assert data == {"step": 2, "total_steps": 2, "train_loss": 1.5, "valid_loss": 1.7,
                    "valid_mean_token_accuracy": 0.5}
    assert metrics_message(data) == "Step 2/2: training loss=1.5000, validation loss=1.7000"
    assert metrics_csv(path).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy", "1,2.0,,,", "2,1.5,,1.7,0.5"]
    method = {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": "auto"}}}
    resolved = resolved_method(method, {"train": {"epochs": 3.0, "batch_size": 4, "learning_rate_multiplier": 1.0}})
    assert resolved["supervised"]["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}


def test_bad_requests_name_the_field() -> None:
    for body, fragment in [({"suffix": "a b"}, "suffix"), ({"method": {"type": "reinforcement"}}, "reinforcement"),
                           ({"integrations": [{"type": "wandb"}]}, "integrations"), ({"seed": -1}, "seed"),
                           ({"metadata": {str(i): "x" for i in range(17)}}, "16 keys")]:
        with pytest.raises(Exception, match=fragment):
            CreateJobRequest.model_validate({"model": "base", "training_file": "file-x", **body})
