"""The forgetting check: the shipped probe, its matchers, the verdict rule, and a run on the tiny model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.evaluation.forgetting import (
    CATEGORIES,
    ProbeItem,
    first_number,
    forgetting_verdict,
    load_general_text,
    load_probe,
    run_forgetting_check,
    score_probe_answer,
)
from tunelab.evaluation.result import Forgetting
from tunelab.model.precision import Precision

FP32 = Precision(False, "cpu", "fp32 (test)")


def item(match: str, answer: str) -> ProbeItem:
    return ProbeItem("t-01", "knowledge", "question?", answer, match)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the shipped data

def test_probe_has_about_100_unique_items_in_4_categories():
    items = load_probe()
    assert 95 <= len(items) <= 110
    assert len({i.id for i in items}) == len(items)
    counts = Counter(i.category for i in items)
    assert set(counts) == set(CATEGORIES)
    assert all(n >= 20 for n in counts.values()), counts
    assert all(i.prompt.strip() and i.answer.strip() for i in items)


def test_every_probe_answer_satisfies_its_own_matcher_and_a_non_answer_does_not():
    for it in load_probe():
        right = (json.dumps({k: 1 for k in it.answer.split(",")}) if it.match == "json_keys"
                 else it.answer.split("|")[0])
        assert score_probe_answer(it, right), it
        assert not score_probe_answer(it, "I do not know."), it


def test_general_text_is_about_2000_words():
    assert 1800 <= len(load_general_text().split()) <= 2600


# ---------------------------------------------------------------- matchers

@pytest.mark.parametrize(("answer", "output", "ok"), [
    ("Paris", "The capital of France is Paris.", True),
    ("Paris", "paris", True),
    ("Paris", "Parisian food is good", False),
    ("Paris", "Lyon", False),
    ("carbon dioxide|CO2", "Plants absorb CO2.", True),
    ("carbon dioxide|CO2", "Carbon Dioxide", True),
    ("carbon dioxide|CO2", "oxygen", False),
    ("Au", "The symbol is Au.", True),
    ("Au", "Gold", False),
    ("2020-07-04", "2020-07-04", True),
    ("2020-07-04", "2020-07-045", False),
])
def test_contains_is_a_case_insensitive_whole_word_match(answer, output, ok):
    assert score_probe_answer(item("contains", answer), output) is ok


@pytest.mark.parametrize(("answer", "output", "ok"), [
    ("BANANA", "BANANA", True),
    ("BANANA", "  BANANA.\n", True),
    ("BANANA", "Banana", False),
    ("BANANA", "BANANA!!", False),
    ("BANANA", "Sure! BANANA", False),
    ("The cat sat on the mat", "The cat sat on the mat.", True),
    ("[done]", "[done]", True),
    ("[done]", "done", False),
])
def test_exact_is_case_sensitive_and_forgives_a_trailing_period(answer, output, ok):
    assert score_probe_answer(item("exact", answer), output) is ok


@pytest.mark.parametrize(("answer", "output", "ok"), [
    ("42", "42", True),
    ("42", "The answer is 42.", True),
    ("42", "17 + 25 = 42", True),  # the working is shown: the result follows the last '='
    ("42", "41", False),
    ("42", "It is 24, not 42", False),  # the first number counts
    ("7", "There are seven days in a week.", True),
    ("7", "No idea.", False),
    ("1234567", "1,234,567", True),
    ("144", "144.0", True),
])
def test_number_reads_the_first_number(answer, output, ok):
    assert score_probe_answer(item("number", answer), output) is ok


def test_first_number_handles_thousands_words_and_absence():
    assert first_number("1, 2, 3") == 1.0
    assert first_number("about -3.5 degrees") == -3.5
    assert first_number("twenty") == 20.0
    assert first_number("nothing here") is None


@pytest.mark.parametrize(("output", "ok"), [
    ('{"name": "Alice", "age": 30}', True),
    ('Here it is:\n```json\n{"name": "Alice", "age": 30, "city": "Paris"}\n```', True),
    ('Sure: {"name": "Alice", "age": 30} hope that helps', True),
    ('{"name": "Alice"}', False),  # a key missing
    ("{name: Alice, age: 30}", False),  # not JSON
    ('["name", "age"]', False),  # not an object
    ("name: Alice, age: 30", False),
])
def test_json_keys_needs_an_object_with_every_key(output, ok):
    assert score_probe_answer(item("json_keys", "name,age"), output) is ok


# ---------------------------------------------------------------- the verdict

def test_verdict_not_flagged_on_small_changes():
    flagged, why = forgetting_verdict(0.41, 0.39, 2.91, 2.95, threshold=0.05, loss_tolerance=0.10)
    assert not flagged
    assert "0.02" in why and "0.05" in why and "1.4%" in why


def test_verdict_flags_a_probe_drop_beyond_the_threshold():
    flagged, why = forgetting_verdict(0.41, 0.30, 2.91, 2.91, threshold=0.05, loss_tolerance=0.10)
    assert flagged
    assert "fell 0.11" in why and "threshold 0.05" in why


def test_verdict_drop_equal_to_the_threshold_is_not_flagged_despite_float_error():
    assert 0.46 - 0.41 > 0.05  # the floating point trap the verdict avoids
    assert not forgetting_verdict(0.46, 0.41, 2.0, 2.0, threshold=0.05, loss_tolerance=0.10)[0]
    assert forgetting_verdict(0.47, 0.41, 2.0, 2.0, threshold=0.05, loss_tolerance=0.10)[0]


def test_verdict_flags_a_relative_loss_rise_beyond_the_tolerance():
    assert not forgetting_verdict(0.4, 0.4, 2.0, 2.18, threshold=0.05, loss_tolerance=0.10)[0]  # +9%
    flagged, why = forgetting_verdict(0.4, 0.45, 2.0, 2.3, threshold=0.05, loss_tolerance=0.10)  # +15%
    assert flagged
    assert "15.0%" in why and "tolerance 10%" in why
    assert forgetting_verdict(0.4, 0.4, 2.0, 2.3, threshold=0.05, loss_tolerance=0.20)[0] is False


def test_verdict_improvements_are_never_flagged():
    flagged, why = forgetting_verdict(0.30, 0.50, 3.0, 2.0, threshold=0.0, loss_tolerance=0.0)
    assert not flagged
    assert "rose 0.20" in why and "fell" in why


# ---------------------------------------------------------------- end to end on the tiny model

@pytest.fixture
def fresh_model(tiny_model_dir):
    """A new copy of the tiny model: attaching LoRA changes a model in place, so the shared one is not used."""
    from tunelab.model.load import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    return model, tokenizer


@pytest.fixture
def tiny_peft(fresh_model):
    import peft

    model, tokenizer = fresh_model
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero (adapter = identity): give it weights so the two differ
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return peft_model, tokenizer


def few_items() -> list[ProbeItem]:
    items = load_probe()
    return [next(i for i in items if i.category == c and i.match == m) for c, m in
            [("knowledge", "contains"), ("knowledge", "number"), ("arithmetic", "number"),
             ("instruction", "exact"), ("format", "json_keys"), ("format", "contains")]]


def test_check_runs_end_to_end_and_returns_the_contract(tiny_peft):
    model, tokenizer = tiny_peft
    model.train()
    result = run_forgetting_check(model, tokenizer, FP32, threshold=0.05, batch_size=8, max_new_tokens=6)
    assert result.probe_items == len(load_probe()) == len(result.items)
    assert 0.0 <= result.probe.base <= 1.0 and 0.0 <= result.probe.finetune <= 1.0
    assert result.probe.delta == pytest.approx(result.probe.finetune - result.probe.base)
    g = result.general_text_loss
    assert g.base > 0 and g.finetune > 0 and g.base != pytest.approx(g.finetune)
    assert g.delta == pytest.approx(g.finetune - g.base)
    assert result.threshold == 0.05 and result.loss_tolerance == 0.10
    assert isinstance(result.flagged, bool) and result.why
    assert set(result.categories) == set(CATEGORIES)
    assert [i.id for i in result.items] == [item.id for item in load_probe()]
    assert Forgetting.model_validate_json(result.model_dump_json()) == result  # goes into eval.json as is
    assert model.training  # the train/eval mode is restored


def test_adapter_off_equals_a_separate_base_model(tiny_peft, tiny_loaded):
    model, tokenizer = tiny_peft
    base, _ = tiny_loaded  # the same weights, never given an adapter
    items = few_items()
    via_adapter = run_forgetting_check(model, tokenizer, FP32, threshold=0.05, max_new_tokens=6, items=items)
    via_base = run_forgetting_check(model, tokenizer, FP32, threshold=0.05, max_new_tokens=6, items=items,
                                    base_model=base)
    assert via_adapter.general_text_loss.base == pytest.approx(via_base.general_text_loss.base, rel=1e-5)
    assert via_adapter.general_text_loss.finetune == pytest.approx(via_base.general_text_loss.finetune)
    assert [i.base_ok for i in via_adapter.items] == [i.base_ok for i in via_base.items]
    assert via_adapter.probe_items == len(items)


def test_a_model_without_adapter_needs_base_model(fresh_model):
    model, tokenizer = fresh_model
    with pytest.raises(TunelabError, match="base_model"):
        run_forgetting_check(model, tokenizer, FP32, threshold=0.05, items=few_items())
