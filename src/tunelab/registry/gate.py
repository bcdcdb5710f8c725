"""What the registry reads from a run's eval.json: the promotion gate and the recorded summary.

A pure function of eval.json (docs/eval-format.md), so the rule is testable on its own:
promotion needs the fine-tune significantly better (p < 0.05, delta > 0) than every base
contender it was compared with (base_zero_shot at least), and no forgetting flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)  # why not, one sentence each


def gate(eval_json: dict[str, Any] | None) -> GateResult:
    """May this fine-tune be promoted? Only when eval.json shows it significantly beats every baseline.

    Refused: no eval.json; no comparisons (an eval.json older than docs/eval-format.md);
    no base_zero_shot comparison; any comparison not `significant` with `delta` > 0;
    `forgetting.flagged`.
    """
    if eval_json is None:
        return GateResult(False, ["no eval.json: the fine-tune was never compared with the base model"])
    reasons = []
    metric = eval_json.get("metric", "the metric")
    comparisons = eval_json.get("comparisons")
    if not isinstance(comparisons, dict) or not comparisons:
        reasons.append("eval.json has no comparisons with the base model (written before tunelab-eval/1)")
    else:
        if "base_zero_shot" not in comparisons:
            reasons.append("eval.json has no comparison with base_zero_shot")
        for baseline, c in comparisons.items():
            c = c if isinstance(c, dict) else {}
            delta, significant = c.get("delta"), c.get("significant")
            better = isinstance(delta, (int, float)) and not isinstance(delta, bool) and delta > 0
            if not (better and significant is True):
                reasons.append(f"not significantly better than {baseline}: {metric} delta {delta}, "
                               f"p {c.get('p_value')}, significant {significant}")
    forgetting = eval_json.get("forgetting")
    if isinstance(forgetting, dict) and forgetting.get("flagged") is True:
        reasons.append(f"forgetting flagged: {forgetting.get('why', 'general ability fell past the threshold')}")
    return GateResult(not reasons, reasons)


def eval_summary(eval_json: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the registry records of an eval.json: the primary metric (+ CI) per contender, the comparisons."""
    if eval_json is None:
        return None
    if isinstance(eval_json.get("contenders"), dict):
        metric = eval_json.get("metric")
        contenders = {name: {"value": _dict(body.get("metrics")).get(metric), "ci": _dict(body.get("ci")).get(metric)}
                      for name, body in eval_json["contenders"].items() if isinstance(body, dict)}
        comparisons = {name: {k: body.get(k) for k in ("delta", "delta_ci", "p_value", "significant")}
                       for name, body in _dict(eval_json.get("comparisons")).items() if isinstance(body, dict)}
        forgetting = _dict(eval_json.get("forgetting"))
        return {"format": eval_json.get("format"), "task": eval_json.get("task"), "metric": metric,
                "test_rows": eval_json.get("test_rows"), "contenders": contenders, "comparisons": comparisons,
                "forgetting": {k: forgetting.get(k) for k in ("flagged", "why")} if forgetting else None}
    # The older shape (runs from before docs/eval-format.md): a flat `summary` of accuracies.
    summary = _dict(eval_json.get("summary"))
    contenders = {name: {"value": summary[key], "ci": summary.get(f"{key}_ci")}
                  for name, key in (("finetune", "accuracy"), ("base_prompted", "base_accuracy"))
                  if summary.get(key) is not None}
    return {"format": "summary-only", "task": summary.get("task"), "metric": "accuracy" if contenders else None,
            "test_rows": summary.get("test_rows"), "contenders": contenders, "comparisons": {}, "forgetting": None}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
