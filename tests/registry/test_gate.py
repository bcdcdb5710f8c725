"""tunelab.registry.gate: promotion needs a significant win over every baseline and no forgetting, for
supervised and preference runs alike; the reasons say which rule failed, truthfully."""

from __future__ import annotations

import pytest

from helpers import comparison, eval_json
from tunelab.evaluation.result import EvalResult
from tunelab.registry.gate import eval_summary, gate


def result(**kwargs) -> EvalResult:
    return EvalResult.model_validate(eval_json(**kwargs))


def test_gate_passes_only_a_significant_improvement_over_every_baseline():
    assert gate(result()).ok and gate(result()).reasons == []
    missing = gate(None)
    assert not missing.ok and missing.reasons == ["no eval.json: the fine-tune was never compared with the base model"]

    not_significant = gate(result(base_zero_shot=comparison(0.02, significant=False)))
    assert not not_significant.ok
    assert not_significant.reasons == ["not significantly better than base_zero_shot: accuracy delta +0.0200, p 0.4"]
    worse = gate(result(base_zero_shot=comparison(), base_few_shot=comparison(-0.1, significant=False)))
    assert [r.split(":")[0] for r in worse.reasons] == ["not significantly better than base_few_shot"]
    only_few_shot = gate(result(base_few_shot=comparison()))
    assert only_few_shot.reasons == ["no comparison with base_zero_shot: the base model was not evaluated "
                                     "(eval.compare_base: false)"]
    assert gate(result(flagged=True)).reasons == ["forgetting flagged: probe score fell 0.09 (threshold 0.05)"]


def test_an_evaluation_without_test_rows_says_so():
    empty = EvalResult(task=None, metric=None, test_rows=0)
    assert gate(empty).reasons == ["no comparison with base_zero_shot: the evaluation had no test rows"]


def test_a_preference_run_is_judged_by_its_preferences_like_any_other():
    """DPO runs compare how often each model prefers the chosen answer (evaluate/preference.py). Before, the
    gate refused every DPO run saying its eval.json was written before tunelab-eval/1."""
    good = result(task="preference", metric="preference_accuracy",
                  base_zero_shot=comparison(0.2, metric="preference_accuracy"))
    assert gate(good).ok
    bad = gate(result(task="preference", metric="preference_accuracy",
                      base_zero_shot=comparison(0.01, significant=False, metric="preference_accuracy")))
    assert bad.reasons == ["not significantly better than base_zero_shot: preference_accuracy delta +0.0100, p 0.4"]
    assert not any("tunelab-eval/1" in r for r in bad.reasons)


def test_eval_summary_records_the_primary_metric_and_ci_per_contender():
    s = eval_summary(result())
    assert s["metric"] == "accuracy" and s["test_rows"] == 40 and s["format"] == "tunelab-eval/2"
    assert s["contenders"]["finetune"] == {"value": 0.9, "ci": pytest.approx([0.85, 0.95])}
    assert s["contenders"]["base_zero_shot"]["value"] == pytest.approx(0.6)
    assert s["comparisons"]["base_few_shot"] == {"delta": 0.1, "delta_ci": pytest.approx([0.05, 0.15]), "p_value": 1e-9,
                                                 "significant": True}
    assert s["forgetting"] == {"flagged": False, "why": "probe score fell 0.01 (threshold 0.05)"}
    assert eval_summary(None) is None
