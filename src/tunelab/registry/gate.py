"""What the registry reads from a run's eval.json: the promotion gate and the recorded summary.

A pure function of the evaluation (`EvalResult`, docs/eval-format.md), so the rule is testable on its
own: promotion needs the fine-tune significantly better (p < 0.05, delta > 0) than every base
contender it was compared with (base_zero_shot at least), and no forgetting flagged. Supervised
runs compare generated answers; preference (DPO) runs compare how often each model prefers the
chosen answer (evaluation/preference.py); the rule is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.evaluation.result import EvalResult


@dataclass(frozen=True)
class GateResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)  # why not, one sentence each


def gate(result: EvalResult | None) -> GateResult:
    """May this fine-tune be promoted? Only when its evaluation shows it significantly beats every baseline.

    Refused: no evaluation; no comparison with base_zero_shot (no test rows, or eval.compare_base off);
    any comparison not significant with delta > 0; forgetting flagged.
    """
    if result is None:
        return GateResult(False, ["no eval.json: the fine-tune was never compared with the base model"])
    reasons = []
    if "base_zero_shot" not in result.comparisons:
        why = ("the evaluation had no test rows" if result.test_rows == 0
               else "the base model was not evaluated (eval.compare_base: false)")
        reasons.append(f"no comparison with base_zero_shot: {why}")
    for baseline, c in result.comparisons.items():
        if not (c.delta > 0 and c.significant):
            reasons.append(f"not significantly better than {baseline}: {c.metric} delta {c.delta:+.4f}, "
                           f"p {c.p_value:.3g}")
    if result.forgetting is not None and result.forgetting.flagged:
        reasons.append(f"forgetting flagged: {result.forgetting.why}")
    return GateResult(not reasons, reasons)


def eval_summary(result: EvalResult | None) -> dict[str, Any] | None:
    """What the registry records of an evaluation: the primary metric (+ CI) per contender, the comparisons."""
    if result is None:
        return None
    contenders = {}
    for name in result.contenders:
        value, ci = result.primary(name)
        contenders[name] = {"value": value, "ci": list(ci) if ci else None}
    comparisons = {name: {"delta": c.delta, "delta_ci": list(c.delta_ci), "p_value": c.p_value,
                          "significant": c.significant} for name, c in result.comparisons.items()}
    forgetting = {"flagged": result.forgetting.flagged, "why": result.forgetting.why} if result.forgetting else None
    return {"format": result.format, "task": result.task, "metric": result.metric, "test_rows": result.test_rows,
            "contenders": contenders, "comparisons": comparisons, "forgetting": forgetting}
