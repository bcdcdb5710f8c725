"""Task metrics for `tunelab eval` (docs/eval-format.md): `choose_task` picks the task, `score` scores it.

- classification: accuracy (normalized exact match), macro-F1, confusion matrix;
- structured:     JSON validity, exact match of the parsed value, per-field match;
- free_text:      ROUGE-L F (rouge-score), chrF (sacrebleu), exact and normalized match.
Each is also scored per row, for the paired tests in tunelab.evaluation.stats.

Accuracy comes with a 95% Wilson score interval: unlike the normal approximation
p +- 1.96 sqrt(p(1-p)/n), it stays inside [0, 1] and is sensible at 0% or 100%
(the base model's 0/300 gets [0.0, 1.3%], not [0, 0]).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
TASKS = ("classification", "structured", "free_text")
PRIMARY_METRIC = {"classification": "accuracy", "structured": "json_exact", "free_text": "rouge_l"}
OTHER = "(other)"  # confusion-matrix row and column for answers outside the label set
MAX_LABELS, MAX_LABEL_WORDS, MAX_LABEL_CHARS = 200, 5, 64  # choose_task's "small answer set" (Banking77: 77 labels, CLINC150: 150)
_SETTING_TASK = {"accuracy": "classification", "json": "structured", "text": "free_text"}  # EvalConfig.metric


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion.

    >>> [round(x, 4) for x in wilson_interval(81, 100)]
    [0.7222, 0.8749]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1 (floating point leaves ~1e-19 otherwise).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


_EDGE_PUNCT = re.compile(r"^[\s\"'`.*:]+|[\s\"'`.*:]+$")


def normalize_label(text: str) -> str:
    """Lenient label match, applied alike to every contender: case, edge punctuation, spaces vs underscores.
    Only the first line counts (a label is one line; models like to explain after it).

    >>> normalize_label(' "Card arrival." ')
    'card_arrival'
    """
    text = _EDGE_PUNCT.sub("", text.strip().splitlines()[0] if text.strip() else "")
    return re.sub(r"[\s\-]+", "_", text.lower())


def normalize_text(text: str) -> str:
    """Lenient match for free text: case, runs of whitespace, edge punctuation. Not normalize_label,
    which keeps the first line only: two answers whose first lines agree are not equal.

    >>> normalize_text('  The cat\\n sat. ')
    'the cat sat'
    """
    return _EDGE_PUNCT.sub("", " ".join(text.lower().split()))


def accuracy(predictions: list[str], references: list[str]) -> dict[str, float | int | list[float]]:
    """Accuracy of normalized exact match, with its 95% Wilson interval."""
    assert len(predictions) == len(references)
    correct = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    n = len(references)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "accuracy_ci": [low, high], "correct": correct, "n": n}


# ---------------------------------------------------------------- classification


def _encode(predictions: list[str], references: list[str],
            labels: list[str] | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Normalized label names, and (n_rows,) int arrays of prediction and reference ids (len(names) = outside)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: need one per row.")
    refs = [normalize_label(r) for r in references]
    names = list(dict.fromkeys(sorted(set(refs)) if labels is None else map(normalize_label, labels)))
    index = {name: i for i, name in enumerate(names)}
    pred = np.array([index.get(normalize_label(p), len(names)) for p in predictions], dtype=np.int64)
    return names, pred, np.array([index.get(r, len(names)) for r in refs], dtype=np.int64)


def _macro_f1_ids(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Macro-F1 over label ids 0..k-1 (id k = outside the label set, not a class of its own)."""
    n_pred = np.bincount(pred, minlength=k + 1)[:k]
    n_ref = np.bincount(ref, minlength=k + 1)[:k]
    tp = np.bincount(ref[pred == ref], minlength=k + 1)[:k]
    seen = n_pred + n_ref > 0  # a label neither predicted nor referenced is skipped
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (n_pred + n_ref): 0, not 0/0, for a label never predicted.
    return float(np.mean(2 * tp[seen] / (n_pred + n_ref)[seen])) if seen.any() else 0.0


def macro_f1(predictions: list[str], references: list[str], labels: list[str] | None = None) -> float:
    """Unweighted mean of per-label F1 over normalized labels (each label counts once, however rare).

    labels defaults to the sorted set of normalized references. A label neither predicted
    nor referenced is skipped; one never predicted, or never referenced, has F1 0.

    >>> round(macro_f1(["a", "a", "b", "b", "c", "c"], ["a", "a", "a", "b", "b", "c"]), 4)
    0.6556

    (a: P 1, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 0.5; c: P 1/2, R 1, F1 2/3.)
    """
    names, pred, ref = _encode(predictions, references, labels)
    return _macro_f1_ids(pred, ref, len(names))


def macro_f1_resampler(predictions: list[str], references: list[str],
                       labels: list[str] | None = None) -> Callable[[np.ndarray], float]:
    """fn(row indices) -> macro-F1 of those rows, for stats.bootstrap_ci_indices: labels are normalized
    once, and the label set comes from all rows, as on the full data, not from each resample."""
    names, pred, ref = _encode(predictions, references, labels)
    return lambda idx: _macro_f1_ids(pred[idx], ref[idx], len(names))


def confusion_matrix(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, list]:
    """Counts of (reference, prediction) pairs: rows = reference, columns = prediction, labels normalized.

    A prediction outside the label set is counted in a final "(other)" column, a
    reference outside it in a final "(other)" row; "(other)" is added only when
    needed, then to both axes, so the matrix stays square and "labels" names both.

    >>> confusion_matrix(["a", "banana", "b", "a"], ["a", "a", "b", "b"], ["a", "b"])
    {'labels': ['a', 'b', '(other)'], 'matrix': [[1, 0, 1], [1, 1, 0], [0, 0, 0]]}
    """
    names, pred, ref = _encode(predictions, references, labels)
    k = len(names)
    matrix = np.bincount(ref * (k + 1) + pred, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)  # (k+1, k+1)
    if matrix[k].any() or matrix[:, k].any():
        return {"labels": [*names, OTHER], "matrix": matrix.tolist()}
    return {"labels": names, "matrix": matrix[:k, :k].tolist()}


# ---------------------------------------------------------------- structured output (JSON)

# One Markdown fence around the whole answer, as chat models often write: ```json\n{...}\n```
_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (Python's json module accepts it, the standard does not)")


def parse_json_answer(text: str) -> tuple[Any, str | None]:
    """Parse an answer as strict JSON: (value, None), or (None, why it is not JSON).

    The stripped text must be one JSON value and nothing else: trailing text is
    invalid. One surrounding ```json ... ``` (or ``` ... ```) fence is accepted, as
    models often write one. NaN and Infinity are rejected. Duplicate keys keep the
    last value (json.loads' rule). Check the error, not the value: "null" gives (None, None).

    >>> parse_json_answer('```json\\n{"a": 1, "a": 2}\\n```')
    ({'a': 2}, None)
    >>> parse_json_answer('{"a": 1} thanks')
    (None, 'Extra data: line 1 column 10 (char 9)')
    """
    body = text.strip()
    fence = _FENCE.match(body)
    body = fence.group(1).strip() if fence else body
    if not body:
        return None, "empty answer"
    try:
        return json.loads(body, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; RecursionError: nested too deep
        return None, str(err) or type(err).__name__


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: key order is irrelevant and 1 == 1.0 (one JSON number),
    but true != 1 and "1" != 1 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # strings and null


def json_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Validity, exact match and per-field match of JSON answers, as fractions of rows.

    json_valid: predictions that parse; json_exact: parsed prediction json_equal to the
    parsed reference; per_field: for each top-level key of the reference objects, over
    the rows whose reference has it, the fraction whose prediction is an object with an
    equal value there (a reference that is not an object is skipped); field_match: the
    mean of per_field (None when no reference is an object).

    >>> m = json_metrics(['{"name": "Ada", "age": 36}', '{"name": "Bob"}', 'oops'],
    ...                  ['{"age": 36.0, "name": "Ada"}', '{"name": "Bob", "age": 7}', '{"name": "Cy"}'])
    >>> m["json_valid"], m["json_exact"], m["per_field"], m["field_match"]
    (0.6666666666666666, 0.3333333333333333, {'age': 0.5, 'name': 0.6666666666666666}, 0.5833333333333333)
    """
    return _json_scores(predictions, references)[0]


def _json_scores(predictions: list[str], references: list[str]) -> tuple[dict[str, Any], list[bool]]:
    """json_metrics, and which rows match exactly (each answer parsed once)."""
    valid, exact = [], []
    hits: dict[str, list[bool]] = {}  # key -> one bool per row whose reference has it, in first-seen order
    for (pred, p_err), (ref, r_err) in zip(map(parse_json_answer, predictions), map(parse_json_answer, references)):
        valid.append(p_err is None)
        exact.append(p_err is None and r_err is None and json_equal(pred, ref))
        for key, value in ref.items() if r_err is None and isinstance(ref, dict) else ():
            hits.setdefault(key, []).append(isinstance(pred, dict) and key in pred and json_equal(pred[key], value))
    n, per_field = len(exact), {key: sum(h) / len(h) for key, h in hits.items()}
    return {
        "json_valid": sum(valid) / n if n else 0.0,
        "json_exact": sum(exact) / n if n else 0.0,
        "field_match": sum(per_field.values()) / len(per_field) if per_field else None,
        "per_field": per_field,
    }, exact


# ---------------------------------------------------------------- free text

# Ideographs and kana are written without spaces: one token each, so ROUGE-L can match within a sentence.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


class UnicodeTokenizer:
    """ROUGE tokenizer for any script: lower case, runs of word characters, one token per CJK character.

    rouge-score's default keeps only [a-z0-9] ("café" -> "caf"; Japanese -> nothing, so two
    identical Japanese answers score 0). No stemming: Porter's rules are English-only.

    >>> UnicodeTokenizer().tokenize("Café, 猫が!")
    ['café', '猫', 'が']
    """

    def tokenize(self, text: str) -> list[str]:  # the method rouge_scorer.RougeScorer calls
        return re.findall(r"\w+", _CJK.sub(r" \1 ", text.lower()))


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Per-row ROUGE-L F-measure (longest common subsequence of tokens), in [0, 1]. Two answers
    without tokens ("", "...") score 1 if their normalized text is equal (rouge-score alone says 0).

    >>> [round(x, 4) for x in rouge_l(["the cat sat on the mat", ""], ["the cat lay on a mat", ""])]
    [0.6667, 1.0]
    """
    from rouge_score import rouge_scorer  # imported here: it pulls in nltk (~0.3 s), only free text needs it

    tokenizer = UnicodeTokenizer()
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)
    return [
        scorer.score(ref, pred)["rougeL"].fmeasure  # score(target, prediction)
        if tokenizer.tokenize(pred) or tokenizer.tokenize(ref)
        else float(normalize_text(pred) == normalize_text(ref))
        for pred, ref in zip(predictions, references)
    ]


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2: sacrebleu's defaults) in [0, 1], not sacrebleu's 0-100.
    Statistics summed over rows, then one F-score, as sacrebleu reports it; any script works."""
    from sacrebleu.metrics import CHRF  # imported here like rouge_score: only free text needs it

    return CHRF().corpus_score(list(predictions), [list(references)]).score / 100 if references else 0.0


# ---------------------------------------------------------------- task choice and the entry point


def choose_task(references: list[str]) -> tuple[str, str, str]:
    """Decide the task from the reference answers: (task, primary metric, why).

    Rules, in order: (1) every reference parses as a JSON object or array -> structured,
    json_exact; (2) a small answer set -> classification, accuracy: at most 200 distinct
    normalized answers and at most half the rows, every answer at most 5 words and 64
    characters; (3) otherwise free_text, rouge_l. `why` is one sentence with the numbers.

    >>> choose_task(["yes", "no", "yes", "no"])
    ('classification', 'accuracy', '2 distinct answers over 4 rows: a label set')
    """
    n = len(references)
    if n == 0:
        raise ValueError("choose_task got no reference answers: evaluation needs at least one test row.")
    if all(err is None and isinstance(v, (dict, list)) for v, err in map(parse_json_answer, references)):
        return "structured", "json_exact", f"all {n} answers parse as JSON objects or arrays: structured output"
    distinct = len({normalize_label(r) for r in references})
    words, chars = max(len(r.split()) for r in references), max(len(r.strip()) for r in references)
    counted = f"{distinct} distinct answers over {n} rows"
    if distinct > MAX_LABELS or distinct > n / 2:
        return "free_text", "rouge_l", f"{counted} (more than {MAX_LABELS} or more than half the rows): free text"
    if words > MAX_LABEL_WORDS or chars > MAX_LABEL_CHARS:
        return "free_text", "rouge_l", (f"{counted}, but the longest has {words} words and {chars} characters "
                                        f"(a label has at most {MAX_LABEL_WORDS} and {MAX_LABEL_CHARS}): free text")
    return "classification", "accuracy", f"{counted}: a label set"


def task_for_metric_setting(setting: str, references: list[str]) -> tuple[str, str, str]:
    """Map EvalConfig.metric (auto | accuracy | json | text) to (task, primary metric, why).

    >>> task_for_metric_setting("json", ["anything"])
    ('structured', 'json_exact', 'set in the config (eval.metric: json)')
    """
    if setting == "auto":
        return choose_task(references)
    if setting not in _SETTING_TASK:
        raise ValueError(f"eval.metric is {setting!r}; use one of auto, accuracy, json, text.")
    task = _SETTING_TASK[setting]
    return task, PRIMARY_METRIC[task], f"set in the config (eval.metric: {setting})"


@dataclass
class RowScores:
    """A contender's scores on the test rows, in row order (eval.json's contender fields)."""

    metrics: dict[str, Any]  # aggregate metrics by name, fractions in [0, 1] (structured adds per_field)
    scores: list[float]  # per row, the primary metric: 0/1 for accuracy and json_exact, ROUGE-L F for free text
    correct: list[bool]  # per row: normalized label match / parsed-JSON equality / normalized text match
    confusion: dict[str, list] | None = None  # classification only (confusion_matrix)


def score(task: str, predictions: list[str], references: list[str], labels: list[str] | None = None) -> RowScores:
    """Score one contender's predictions for a task (choose_task's first value). labels (classification
    only) fixes the label set of macro-F1 and the confusion matrix; None = the normalized references.

    >>> s = score("classification", ["Yes", "no", "maybe"], ["yes", "no", "no"])
    >>> s.metrics["accuracy"], s.metrics["exact_match"], s.scores, s.confusion["labels"]
    (0.6666666666666666, 0.3333333333333333, [1.0, 1.0, 0.0], ['no', 'yes', '(other)'])
    """
    if len(predictions) != len(references):
        raise ValueError(f"score got {len(predictions)} predictions for {len(references)} references; "
                         "generate exactly one prediction per test row.")
    n = len(references)
    exact_match = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n if n else 0.0
    if task == "classification":
        correct = [normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references)]
        labels = sorted({normalize_label(r) for r in references}) if labels is None else labels
        accuracy_ = sum(correct) / n if n else 0.0
        metrics = {"accuracy": accuracy_, "macro_f1": macro_f1(predictions, references, labels),
                   "exact_match": exact_match, "normalized_match": accuracy_}  # the same as accuracy, by name
        confusion = confusion_matrix(predictions, references, labels)
        return RowScores(metrics, [float(c) for c in correct], correct, confusion)
    if task == "structured":
        metrics, correct = _json_scores(predictions, references)
        return RowScores(metrics, [float(c) for c in correct], correct)
    if task == "free_text":
        correct = [normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references)]
        rows = rouge_l(predictions, references)
        metrics = {"rouge_l": sum(rows) / n if n else 0.0, "chrf": chrf(predictions, references),
                   "exact_match": exact_match, "normalized_match": sum(correct) / n if n else 0.0}
        return RowScores(metrics, rows, correct)
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)} (choose_task picks one).")
