"""tunelab.planning: estimates from a measured probe, before any run directory exists, and where every
hyperparameter comes from (held against real runs in tests/integration/test_plan.py)."""

from __future__ import annotations

from tunelab.config import RunConfig
from tunelab.planning import make_plan


def test_plan_measures_the_run_and_writes_nothing(classification_csv, tmp_path, make_config):
    plan = make_plan(make_config(classification_csv), probe_steps=2, price_per_hour=3.6)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written
    est = plan.estimate_seconds
    assert min(est.setup, est.train, est.validation, est.evaluation) >= 0 and est.train > 0 and est.evaluation > 0
    assert est.total == est.setup + est.train + est.validation + est.evaluation
    assert plan.cost.total == 3.6 * est.total / 3600
    assert plan.probe.steps == 2 and plan.probe.tokens > 0 and plan.peak_memory_mb > 0
    assert plan.data.rows == 75 and plan.evaluation_rows == 6 and plan.unit == "example"
    assert plan.hardware and plan.precision.startswith("fp32")


def test_the_plan_says_which_values_were_set_which_are_defaults_and_which_were_chosen(tiny_model_dir,
                                                                                      classification_csv, tmp_path):
    """A config with only the data: epochs, batch and learning rate are chosen for the data, and said to be;
    nothing is called "set in the config" that the config did not set."""
    raw = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
           "data": {"path": str(classification_csv), "input_column": "text", "output_column": "label"},
           "train": {"precision": "fp32"}, "eval": {"max_rows": 4, "forgetting_probe": False}}
    plan = make_plan(RunConfig.model_validate(raw), probe_steps=1)
    sources = {name: hp.source for name, hp in plan.hyperparameters.items()}
    assert sources == {"epochs": "auto", "batch_size": "auto", "learning_rate": "auto", "grad_accumulation": "default"}
    assert "example passes" in plan.hyperparameters["epochs"].why
    assert "tokens per micro-batch" in plan.hyperparameters["batch_size"].why
    assert plan.hyperparameters["grad_accumulation"].why == "tunelab's default"
    raw["train"]["epochs"] = 2
    assert make_plan(RunConfig.model_validate(raw), probe_steps=1).hyperparameters["epochs"].source == "config"


def test_the_evaluation_estimate_prices_one_loss_pass_however_often_training_validates(classification_csv,
                                                                                          make_config, monkeypatch):
    """The reference loss is about one validation-like pass per contender: it must not be multiplied by the number of
    validations training runs (eval_every), as it once was."""
    import tunelab.planning as planning

    monkeypatch.setattr(planning, "time_validation_pass", lambda s: 2.0)
    monkeypatch.setattr(planning, "_generation_seconds", lambda *a, **k: 0.0)
    estimates = []
    for eval_every in (0, 1):
        cfg = make_config(classification_csv)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": eval_every}),
                                     "eval": cfg.eval.model_copy(update={"forgetting_probe": False})})
        plan = make_plan(cfg, probe_steps=1)
        estimates.append(plan.estimate_seconds)
    assert estimates[0].evaluation == estimates[1].evaluation > 0
    assert estimates[1].validation > estimates[0].validation  # training's own validations do scale with eval_every
