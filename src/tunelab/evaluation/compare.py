"""The fine-tune against a baseline on the same rows: the difference, its interval, a paired test, wins and losses.

    comparison = compare(finetune, baseline, examples, metric="accuracy")   # -> result.Comparison
    intervals = confidence_intervals("classification", scored, predictions, references, labels, seed=0)

Right/wrong metrics (accuracy, exact match) are compared with McNemar's exact test on the rows where
the two disagree; scores (ROUGE-L) with the paired bootstrap. Significant means p < ALPHA and the
fine-tune ahead; the registry's promotion gate reads exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.evaluation.metrics import macro_f1_resampler
from tunelab.evaluation.result import Comparison, Contender, Example
from tunelab.evaluation.stats import bootstrap_ci, bootstrap_ci_indices, mcnemar, paired_bootstrap

ALPHA = 0.05  # significance level of the comparisons (and of the promotion gate)
EXAMPLES_KEPT = 10  # wins / losses quoted per comparison


@dataclass(frozen=True)
class RowText:
    """What a quoted win or loss shows of its row."""

    source: str
    prompt: str
    reference: str


def confidence_intervals(task: str, scored, predictions: list[str], references: list[str],
                         labels: list[str] | None, seed: int) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap interval of each per-row metric (macro-F1 by resampling rows)."""
    ci = {}
    primary = {"classification": "accuracy", "structured": "json_exact", "free_text": "rouge_l"}[task]
    ci[primary] = tuple(bootstrap_ci(scored.scores, seed=seed))
    if task == "classification":
        ci["macro_f1"] = tuple(bootstrap_ci_indices(len(references), macro_f1_resampler(predictions, references, labels),
                                                    seed=seed))
    else:
        ci["normalized_match"] = tuple(bootstrap_ci([float(c) for c in scored.correct], seed=seed))
    return ci


def compare(finetune: Contender, baseline: Contender, rows: list[RowText], metric: str, seed: int = 0) -> Comparison:
    """Fine-tune vs one baseline on the same rows: delta with its interval, a paired test, wins and losses."""
    a, b = np.asarray(finetune.scores), np.asarray(baseline.scores)
    paired = paired_bootstrap(a, b, seed=seed)
    binary = set(np.unique(np.concatenate([a, b])).tolist()) <= {0.0, 1.0}
    if binary:  # right/wrong per row: McNemar's exact test on the rows where they disagree
        test = mcnemar(finetune.correct, baseline.correct)
        p_value, test_name = test.p_value, "mcnemar"
    else:
        p_value, test_name = paired.p_value, "paired_bootstrap"
    fine_right, base_right = np.asarray(finetune.correct), np.asarray(baseline.correct)
    wins = np.flatnonzero(fine_right & ~base_right).tolist()
    losses = np.flatnonzero(~fine_right & base_right).tolist()

    def example(i: int) -> Example:
        return Example(source=rows[i].source, prompt=rows[i].prompt, reference=rows[i].reference,
                       finetune=finetune.predictions[i], baseline=baseline.predictions[i])

    delta = float(a.mean() - b.mean())
    return Comparison(
        metric=metric, finetune=float(a.mean()), baseline=float(b.mean()), delta=delta,
        delta_ci=tuple(paired.delta_ci), test=test_name, p_value=p_value,
        significant=bool(p_value < ALPHA and delta > 0), wins=len(wins), losses=len(losses),
        win_examples=[example(i) for i in wins[:EXAMPLES_KEPT]],
        loss_examples=[example(i) for i in losses[:EXAMPLES_KEPT]],
    )
