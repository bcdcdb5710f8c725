"""tunelab.evaluation.metrics: Wilson interval, label normalisation, accuracy, and the task metrics
(macro-F1, confusion, JSON, ROUGE-L, chrF), the task choice and `score`."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from tunelab.evaluation import metrics
from tunelab.evaluation.metrics import (
    Z_95,
    accuracy,
    choose_task,
    chrf,
    confusion_matrix,
    json_equal,
    json_metrics,
    macro_f1,
    macro_f1_resampler,
    normalize_label,
    normalize_text,
    parse_json_answer,
    rouge_l,
    score,
    task_for_metric_setting,
    wilson_interval,
)


def test_wilson_zero_successes():
    low, high = wilson_interval(0, 300)
    assert low == pytest.approx(0.0, abs=1e-12)  # centre - half cancels to ~1e-18, not exactly 0
    # By hand: p = 0 -> high = (z^2/n) / (1 + z^2/n)
    z2n = Z_95**2 / 300
    assert high == pytest.approx(z2n / (1 + z2n), abs=1e-12)
    assert round(high, 5) == 0.01264


def test_wilson_known_case():
    assert [round(x, 4) for x in wilson_interval(81, 100)] == [0.7222, 0.8749]


def test_wilson_all_successes_and_symmetry():
    low, high = wilson_interval(50, 50)
    assert high == 1.0 and 0.9 < low < 1.0
    a = wilson_interval(30, 100)
    b = wilson_interval(70, 100)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])


def test_wilson_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_contains_p_and_narrows_with_n():
    for k, n in [(1, 3), (5, 10), (37, 40), (400, 1000)]:
        low, high = wilson_interval(k, n)
        assert low <= k / n <= high
    assert math.isclose(Z_95, 1.959963984540054)
    width = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (10, 100, 1000)]
    assert width[0] > width[1] > width[2]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (' "Card arrival." ', "card_arrival"),
        ("card_arrival", "card_arrival"),
        ("CARD-ARRIVAL", "card_arrival"),
        ("`card_arrival`:", "card_arrival"),
        ("card_arrival\nbecause the card is late", "card_arrival"),
        ("**top up**", "top_up"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_accuracy():
    result = accuracy(["Card arrival", "refund", "top_up", "nonsense"], ["card_arrival", "refund", "top-up", "lost_phone"])
    assert result["correct"] == 3 and result["n"] == 4
    assert result["accuracy"] == 0.75
    assert result["accuracy_ci"] == list(wilson_interval(3, 4))
    empty = accuracy([], [])
    assert empty["accuracy"] == 0.0 and empty["accuracy_ci"] == [0.0, 1.0]


def test_docstring_examples():
    assert doctest.testmod(metrics).failed == 0


# ---------------------------------------------------------------- classification


def test_macro_f1_hand_computed_three_classes():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    # a: P 2/2, R 2/3 -> F1 0.8;  b: P 1/2, R 1/2 -> 0.5;  c: P 1/2, R 1/1 -> 2/3.
    expected = (0.8 + 0.5 + 2 / 3) / 3
    assert macro_f1(preds, refs) == pytest.approx(expected)
    # Normalized like accuracy; a label neither predicted nor referenced is skipped.
    assert macro_f1([p.upper() + "." for p in preds], refs, labels=["a", "b", "c", "d"]) == pytest.approx(expected)


def test_macro_f1_zero_for_unpredicted_or_unreferenced_labels():
    # "b" referenced, never predicted: F1 0. a: P 1/2, R 1 -> 2/3.
    assert macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    # "d" predicted, never referenced: 0 when it is in the label set, ignored when labels come from references.
    refs, preds = ["a", "a", "b"], ["a", "d", "b"]
    assert macro_f1(preds, refs, labels=["a", "b", "d"]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert macro_f1(preds, refs) == pytest.approx((2 / 3 + 1) / 2)
    assert macro_f1([], []) == 0.0
    with pytest.raises(ValueError, match="one per row"):
        macro_f1(["a"], ["a", "b"])


def test_macro_f1_resampler_matches_macro_f1():
    refs = ["a", "a", "a", "b", "b", "c", "d"]
    preds = ["a", "b", "a", "b", "c", "c", "zzz"]
    fn = macro_f1_resampler(preds, refs)
    assert fn(np.arange(7)) == pytest.approx(macro_f1(preds, refs))
    # A resample keeps the full label set: rows 0 and 1 alone still average over a, b, c, d (c, d skipped: unseen).
    idx = np.array([0, 1, 1])
    assert fn(idx) == pytest.approx(macro_f1(["a", "b", "b"], ["a", "a", "a"], labels=["a", "b", "c", "d"]))
    assert fn(idx) == pytest.approx((2 * 1 / (1 + 3) + 0) / 2)  # a: TP 1, 1 predicted, 3 referenced; b: 0


def test_confusion_matrix_with_out_of_label_prediction():
    refs = ["a", "a", "b", "b", "b"]
    preds = ["a", "banana", "b", "A", "I think b"]
    result = confusion_matrix(preds, refs, ["a", "b"])
    assert result["labels"] == ["a", "b", "(other)"]
    assert result["matrix"] == [
        [1, 0, 1],  # reference a: once a, once outside the label set
        [1, 1, 1],  # reference b: a, b, outside
        [0, 0, 0],  # no reference outside the label set
    ]
    # All inside: no "(other)"; a reference outside the labels lands in the "(other)" row.
    assert confusion_matrix(["a", "b"], ["a", "b"], ["a", "b"]) == {"labels": ["a", "b"], "matrix": [[1, 0], [0, 1]]}
    assert confusion_matrix(["a"], ["zzz"], ["a", "b"])["matrix"] == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": {"b": [1, 2, {"c": null}]}}\n', {"a": {"b": [1, 2, {"c": None}]}}),
        ("[1, 2, 3]", [1, 2, 3]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```JSON\n{"a": 1}```', {"a": 1}),
        ('```\n[true]\n```', [True]),
        ('{"name": "Zoë", "city": "東京"}', {"name": "Zoë", "city": "東京"}),
        ('{"name": "Zo\\u00eb"}', {"name": "Zoë"}),
        ('{"a": 1, "a": 2}', {"a": 2}),  # duplicate keys: json.loads keeps the last
        ("42", 42),
    ],
)
def test_parse_json_answer_valid(text, value):
    parsed, error = parse_json_answer(text)
    assert error is None and parsed == value


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("```json\n```", "empty"),
        ('{"a": 1} and that is all', "Extra data"),
        ('```json\n{"a": 1}\n``` hope this helps', "Expecting value"),
        ('Here you go: {"a": 1}', "Expecting value"),
        ("{'a': 1}", "double quotes"),
        ('{"a": 1,}', "line 1 column 9"),  # the wording changed in Python 3.13, the location did not
        ('{"a": NaN}', "NaN is not JSON"),
        ('{"a": ', "Expecting value"),
    ],
)
def test_parse_json_answer_invalid(text, error):
    parsed, why = parse_json_answer(text)
    assert parsed is None and error in why


def test_parse_json_null_is_valid():
    assert parse_json_answer("null") == (None, None)


def test_json_equal():
    assert json_equal({"a": 1, "b": [1.0, {"c": "x"}]}, {"b": [1, {"c": "x"}], "a": 1.0})
    assert not json_equal({"a": True}, {"a": 1})  # Python says True == 1; JSON does not
    assert not json_equal([1, 2], [2, 1])  # array order matters
    assert not json_equal({"a": "1"}, {"a": 1})
    assert not json_equal({"a": 1}, {"a": 1, "b": None})
    assert json_equal(None, None) and not json_equal(None, 0)


def test_json_metrics_edge_cases():
    refs = [
        '{"name": "Ada", "tags": ["x", "y"], "addr": {"city": "Zürich"}}',
        '{"name": "Bob", "tags": [], "addr": {"city": "Oslo"}}',
        '{"name": "Cy", "tags": ["z"]}',
        '["not", "an", "object"]',
        '{"name": "Dee", "tags": ["q"], "addr": {"city": "Rome"}}',
    ]
    preds = [
        '```json\n{"addr": {"city": "Zürich"}, "tags": ["x", "y"], "name": "Ada"}\n```',  # exact, fenced, reordered
        '{"name": "Bob", "tags": [], "addr": {"city": "Oslo"}} trailing',  # invalid: trailing text
        '{"name": "Cy", "tags": ["z"], "extra": 1}',  # valid, not exact, every reference field right
        '["not", "an", "object"]',  # exact; its row is skipped by per-field
        '{"name": "Dee", "name": "Eve", "tags": ["q"], "addr": {"city": "rome"}}',  # duplicate keys: last wins
    ]
    m = json_metrics(preds, refs)
    assert m["json_valid"] == pytest.approx(4 / 5)
    assert m["json_exact"] == pytest.approx(2 / 5)
    # name: rows 0,1,2,4 -> right in 0, 2 ("Eve" != "Dee"); tags: right in 0, 2, 4; addr: rows 0,1,4 -> right in 0.
    assert m["per_field"] == pytest.approx({"name": 2 / 4, "tags": 3 / 4, "addr": 1 / 3})
    assert list(m["per_field"]) == ["name", "tags", "addr"]
    assert m["field_match"] == pytest.approx((2 / 4 + 3 / 4 + 1 / 3) / 3)


def test_json_metrics_without_objects_and_empty():
    m = json_metrics(["[1]", ""], ["[1]", "[2]"])
    assert m["json_valid"] == 0.5 and m["json_exact"] == 0.5
    assert m["per_field"] == {} and m["field_match"] is None
    assert json_metrics([], []) == {"json_valid": 0.0, "json_exact": 0.0, "field_match": None, "per_field": {}}


# ---------------------------------------------------------------- free text


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": 4 of 6 tokens each side.
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on a mat"])[0] == pytest.approx(2 / 3)
    # Case and punctuation are not tokens; word order matters (LCS 1 of 2 tokens).
    assert rouge_l(["The CAT, sat!", "sat cat"], ["the cat sat", "cat sat"]) == pytest.approx([1.0, 0.5])
    assert rouge_l(["", "...", "cat"], ["", "...", ""]) == [1.0, 1.0, 0.0]


def test_rouge_l_unicode():
    # rouge-score's own tokenizer drops every non-ASCII character; ours keeps them.
    assert rouge_l(["猫が座った"], ["猫が座った"]) == [1.0]
    partial = rouge_l(["猫が寝た"], ["猫が座った"])[0]  # common subsequence 猫, が, た: P 3/4, R 3/5
    assert partial == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert rouge_l(["café crème"], ["café noir"]) == [0.5]  # "café" survives whole, not as "caf"


def test_chrf():
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert chrf(["xyz"], ["abc"]) == 0.0
    partial = chrf(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert 0.5 < partial < 1.0
    assert chrf(["東京に行った"], ["東京に行った"]) == pytest.approx(1.0)
    assert chrf([], []) == 0.0


def test_normalize_text_keeps_every_line():
    assert normalize_text("  The cat\n sat. ") == "the cat sat"
    assert normalize_text("same\nfirst line") != normalize_text("same\nsecond line")


# ---------------------------------------------------------------- task choice


def test_choose_task_structured():
    refs = ['{"a": 1}', "[1, 2]", '  {"b": {"c": []}} ']
    assert choose_task(refs) == (
        "structured", "json_exact", "all 3 answers parse as JSON objects or arrays: structured output"
    )
    # One answer that is not an object or array (a JSON number, or text) is enough to say no.
    assert choose_task(['{"a": 1}', "42"] * 3)[0] == "classification"
    assert choose_task(['{"a": 1}', "not json"])[0] == "free_text"


def test_choose_task_classification_and_its_why():
    refs = [f"label_{i % 42}" for i in range(500)]
    assert choose_task(refs) == ("classification", "accuracy", "42 distinct answers over 500 rows: a label set")
    # Boundaries: 200 distinct over 400 rows is a label set, 201 over 1,000 is not, and neither is more than
    # half the rows; "Yes" and "yes." are one answer. Banking77's 77 intents are a label set.
    assert choose_task([f"l{i % 200}" for i in range(400)])[0] == "classification"
    assert choose_task([f"l{i % 201}" for i in range(1000)])[0] == "free_text"
    assert choose_task([f"l{i % 51}" for i in range(100)])[0] == "free_text"
    assert choose_task([f"intent_{i % 77}" for i in range(10003)])[0] == "classification"
    assert choose_task(["Yes", "yes.", "no", "NO"])[2] == "2 distinct answers over 4 rows: a label set"
    assert choose_task(["one two three four five"] * 4)[0] == "classification"


def test_choose_task_free_text_says_why():
    task, metric, why = choose_task([f"answer {i}" for i in range(10)])
    assert (task, metric) == ("free_text", "rouge_l")
    assert why.startswith("10 distinct answers over 10 rows") and why.endswith("free text")
    task, _, why = choose_task(["one two three four five six", "short"] * 5)
    assert task == "free_text" and "6 words" in why
    assert choose_task(["x" * 65, "y"] * 5)[0] == "free_text"  # 65 characters
    # Banking77's longest intent is 48 characters, one word: still a label
    assert choose_task(["balance_not_updated_after_cheque_or_cash_deposit", "y"] * 5)[0] == "classification"
    with pytest.raises(ValueError, match="at least one test row"):
        choose_task([])


def test_task_for_metric_setting():
    refs = ["yes", "no"] * 5
    assert task_for_metric_setting("auto", refs) == choose_task(refs)
    assert task_for_metric_setting("accuracy", ["long free text answer here"]) == (
        "classification", "accuracy", "set in the config (eval.metric: accuracy)"
    )
    assert task_for_metric_setting("json", refs)[:2] == ("structured", "json_exact")
    assert task_for_metric_setting("text", refs) == ("free_text", "rouge_l", "set in the config (eval.metric: text)")
    with pytest.raises(ValueError, match="auto, accuracy, json, text"):
        task_for_metric_setting("bleu", refs)


# ---------------------------------------------------------------- score


def test_score_classification():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["A", "a", "b", "b", "c", "zzz"]
    s = score("classification", preds, refs)
    assert s.correct == [True, True, False, True, False, False]
    assert s.scores == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert s.metrics["accuracy"] == s.metrics["normalized_match"] == pytest.approx(3 / 6)
    assert s.metrics["exact_match"] == pytest.approx(2 / 6)  # "A" is not an exact match
    assert s.metrics["macro_f1"] == pytest.approx(macro_f1(preds, refs))
    assert s.confusion == confusion_matrix(preds, refs, ["a", "b", "c"])
    # A fixed label list reaches macro-F1 and the confusion matrix.
    fixed = score("classification", preds, refs, labels=["c", "b", "a", "d"])
    assert fixed.confusion["labels"] == ["c", "b", "a", "d", "(other)"]


def test_score_structured():
    s = score("structured", ['{"a": 1.0}', '{"a": 2}', "nope"], ['{"a": 1}', '{"a": 3}', '{"a": 1}'])
    assert s.correct == [True, False, False] and s.scores == [1.0, 0.0, 0.0]
    assert s.metrics == json_metrics(['{"a": 1.0}', '{"a": 2}', "nope"], ['{"a": 1}', '{"a": 3}', '{"a": 1}'])
    assert s.metrics["json_valid"] == pytest.approx(2 / 3) and s.metrics["json_exact"] == pytest.approx(1 / 3)
    assert s.metrics["per_field"] == pytest.approx({"a": 1 / 3}) and s.metrics["field_match"] == pytest.approx(1 / 3)
    assert s.confusion is None


def test_score_free_text():
    preds = ["The cat sat.", "the cat sat on the mat", "a dog"]
    refs = ["the cat sat", "the cat lay on a mat", "the cat"]
    s = score("free_text", preds, refs)
    assert s.correct == [True, False, False]
    assert s.scores == pytest.approx([1.0, 2 / 3, 0.0])
    assert s.metrics["rouge_l"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s.metrics["exact_match"] == 0.0 and s.metrics["normalized_match"] == pytest.approx(1 / 3)
    assert 0 < s.metrics["chrf"] < 1 and s.metrics["chrf"] == pytest.approx(chrf(preds, refs))


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="one prediction per test row"):
        score("classification", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="classification, structured, free_text"):
        score("regression", ["a"], ["a"])
