"""tunelab.evaluation.contenders + compare: three contenders on the same rows, compared honestly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.config import EvalConfig
from tunelab.data.batches import collate
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import render_prompt, tokenize_conversations
from tunelab.evaluation.compare import RowText, compare
from tunelab.evaluation.contenders import contender_prompts, draw_shots, evaluate_run, few_shot_messages, reference_loss
from tunelab.evaluation.generate import generate
from tunelab.evaluation.result import Contender
from tunelab.model.precision import choose_precision
from tunelab.model.scoring import validation_loss

FP32 = choose_precision("fp32")


def _conv(text: str, label: str, i: int, system: str | None = "Classify the intent.") -> Conversation:
    msgs = ((Message("system", system),) if system else ()) + (Message("user", text), Message("assistant", label))
    return Conversation(msgs, f"t:{i}")


def test_few_shot_prompt_keeps_the_system_prompt_lists_labels_and_shows_unscored_examples():
    shots = [_conv("when does my card come", "card_arrival", 1), _conv("get my money back", "refund", 2)]
    msgs = few_shot_messages(_conv("where is my card", "card_arrival", 3), shots, ["card_arrival", "refund"])
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0].content.startswith("Classify the intent.\n") and "card_arrival, refund" in msgs[0].content
    assert [m.content for m in msgs[1:5]] == ["when does my card come", "card_arrival", "get my money back", "refund"]
    assert all(m.weight == 0 for m in msgs if m.role == "assistant")  # context, never scored
    assert msgs[-1] == Message("user", "where is my card")
    # without a system prompt and without labels (free text): no system message at all
    bare = few_shot_messages(_conv("hi", "x", 4, system=None), [], None)
    assert [m.role for m in bare] == ["user"]


def test_shots_are_reproducible_and_never_a_test_prompt():
    train = [_conv(f"text {i}", f"l{i % 3}", i) for i in range(30)]
    a, b = draw_shots(train, 4, seed=7), draw_shots(train, 4, seed=7)
    assert [s.source for s in a] == [s.source for s in b] and len(a) == 4
    assert [s.source for s in draw_shots(train, 4, seed=8)] != [s.source for s in a]
    excluded = draw_shots(train, 29, seed=0, exclude={"text 5"})
    assert "t:5" not in {s.source for s in excluded}
    rows = [_conv("text 1", "l1", 100)]  # the same question as a training row: that row is never a shot
    prompts, shots = contender_prompts(rows, train, ["l0", "l1", "l2"], k=29, seed=0)
    assert "t:1" not in {s.source for s in shots}
    assert set(prompts) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert prompts["finetune"] == prompts["base_zero_shot"] == [rows[0].prompt_messages]
    assert contender_prompts(rows, train, None, k=0, seed=0)[0].keys() == {"finetune", "base_zero_shot"}


def test_three_contenders_on_the_same_rows(trained_run):
    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows = result.data.split.test + result.data.split.validation
    cfg = EvalConfig(max_rows=10, batch_size=3, few_shot=2, forgetting_probe=False)
    out = evaluate_run(model, tokenizer, rows, result.data.split.train, cfg, FP32)

    assert out.task == "classification" and out.metric == "accuracy" and "label set" in out.metric_why
    assert out.test_rows == 10 and out.labels == 5 and out.few_shot.k == 2
    contenders = out.contenders
    assert set(contenders) == {"finetune", "base_zero_shot", "base_few_shot"}
    for name, c in contenders.items():
        assert len(c.predictions) == len(c.correct) == len(c.scores) == 10, name
        acc = c.metrics["accuracy"]
        assert acc == sum(c.correct) / 10
        low, high = c.ci["accuracy"]
        assert 0.0 <= low <= acc <= high <= 1.0
        assert c.metrics["loss"] > 0 and c.metrics["perplexity"] == pytest.approx(np.exp(c.metrics["loss"]))
        assert sum(map(sum, c.confusion.matrix)) == 10
    assert contenders["base_few_shot"].prompt_tokens_mean > contenders["base_zero_shot"].prompt_tokens_mean

    # The contenders really are the adapter and the base with the adapter off, on the same rows.
    prompts = [render_prompt(tokenizer, r.prompt_messages) for r in rows[:10]]
    max_new = out.generation.max_new_tokens
    ft = generate(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=10, precision=FP32, stop_strings=["\n"])
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=10, precision=FP32,
                        stop_strings=["\n"])
    assert contenders["finetune"].predictions == [g.text for g in ft.generations]
    assert contenders["base_zero_shot"].predictions == [g.text for g in base.generations]
    assert contenders["finetune"].metrics["loss"] < contenders["base_zero_shot"].metrics["loss"]

    comps = out.comparisons
    assert set(comps) == {"base_zero_shot", "base_few_shot"}
    for name, comp in comps.items():
        assert comp.test == "mcnemar" and 0 < comp.p_value <= 1
        ft_right, base_right = contenders["finetune"].correct, contenders[name].correct
        assert comp.wins == sum(a and not b for a, b in zip(ft_right, base_right))
        assert comp.losses == sum(b and not a for a, b in zip(ft_right, base_right))
        assert comp.delta == pytest.approx(contenders["finetune"].metrics["accuracy"]
                                           - contenders[name].metrics["accuracy"])

    # ...and evaluation leaves the adapter switched on.
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-2


def test_reference_loss_is_the_loss_on_the_answer_tokens(trained_run):
    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows = result.data.split.test
    got = reference_loss(model, tokenizer, rows, [r.prompt_messages for r in rows], FP32, batch_size=3)
    examples, _ = tokenize_conversations(tokenizer, rows, 4096)
    expected = validation_loss(model, [collate(examples, tokenizer.pad_token_id)], FP32)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


def _contender(correct: list[bool]) -> Contender:
    return Contender(metrics={"accuracy": sum(correct) / len(correct)}, ci={}, prompt_tokens_mean=1.0, seconds=1.0,
                     ms_per_request=1.0, predictions=[str(c) for c in correct], correct=correct,
                     scores=[float(c) for c in correct])


def test_compare_counts_wins_and_losses_and_tests_them():
    rows = [RowText(f"t:{i}", f"q{i}", "a") for i in range(40)]
    ft = _contender([True] * 30 + [False] * 10)
    base = _contender([False] * 20 + [True] * 10 + [False] * 10)  # ft wins 20 rows, loses none
    out = compare(ft, base, rows, "accuracy")
    assert out.wins == 20 and out.losses == 0
    assert out.test == "mcnemar" and out.p_value == pytest.approx(2 * 0.5 ** 20)
    assert out.significant and out.delta == pytest.approx(0.5)
    assert len(out.win_examples) == 10 and out.win_examples[0].source == "t:0" and out.win_examples[0].prompt == "q0"
    same = compare(ft, ft, rows, "accuracy")
    assert same.wins == same.losses == 0 and same.p_value == 1.0 and not same.significant
    worse = compare(base, ft, rows, "accuracy")  # significantly worse is not "significant" for the gate
    assert worse.p_value < 0.05 and not worse.significant


def test_reference_loss_with_the_prefix_read_in_place_equals_the_plain_loss(tiny_loaded, monkeypatch):
    """A long shared prefix computed once and read in place gives the loss of every row's whole forward."""
    import tunelab.evaluation.contenders as contenders
    from tunelab.model.kernels import prefix

    model, tokenizer = tiny_loaded
    rows = [_conv(t, lab, i) for i, (t, lab) in enumerate(
        [("where is my card", "card_arrival"), ("refund please", "refund"), ("my card is lost, help", "lost_card"),
         ("hello", "greeting"), ("I want my money back now", "refund")])]
    shots = [_conv("when does my card come", "card_arrival", 10), _conv("get my money back", "refund", 11)]
    prompts = [few_shot_messages(r, shots, ["card_arrival", "refund", "lost_card", "greeting"]) for r in rows]
    calls = []
    real = prefix.shared_prefix_kv
    monkeypatch.setattr(contenders, "shared_prefix_kv", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(contenders, "IN_PLACE_PREFIX", 10_000)
    plain = reference_loss(model, tokenizer, rows, prompts, FP32, 2)
    assert not calls
    monkeypatch.setattr(contenders, "IN_PLACE_PREFIX", 8)
    in_place = reference_loss(model, tokenizer, rows, prompts, FP32, 2)
    assert calls == [1]  # once for all three batches
    assert in_place["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # and both equal each row's loss computed alone, without any shared-prefix pass
    convs = [Conversation((*m, Message("assistant", r.answer)), r.source) for m, r in zip(prompts, rows)]
    examples, _ = tokenize_conversations(tokenizer, convs, 4096)
    alone = validation_loss(model, [collate([e], tokenizer.pad_token_id, share_prefix=False) for e in examples], FP32)
    assert sum(e.trained_tokens for e in examples) > 0
    assert in_place["loss"] == pytest.approx(alone, rel=1e-5)


def test_the_loss_read_off_generation_equals_a_pass_of_its_own(trained_run, monkeypatch):
    """Evaluation reads each contender's reference loss off generation's prompt pass; it equals `reference_loss`,
    and a template whose prompt tokens are not the start of prompt + answer falls back to that pass."""
    import tunelab.evaluation.contenders as contenders

    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows = result.data.split.test[:6]
    train = result.data.split.train
    cfg = EvalConfig(batch_size=3, few_shot=2, forgetting_probe=False)
    prompts, _ = contender_prompts(rows, train, sorted({r.answer for r in train}), 2, 0)
    own_pass = {"finetune": reference_loss(model, tokenizer, rows, prompts["finetune"], FP32, 3)["loss"]}
    with model.disable_adapter():
        for name in ("base_zero_shot", "base_few_shot"):
            own_pass[name] = reference_loss(model, tokenizer, rows, prompts[name], FP32, 3)["loss"]
    passes = []
    real = contenders.reference_loss
    monkeypatch.setattr(contenders, "reference_loss", lambda *a, **k: passes.append(1) or real(*a, **k))
    shared = evaluate_run(model, tokenizer, rows, train, cfg, FP32)
    assert not passes  # no second pass over any prompt
    for name, contender in shared.contenders.items():
        assert contender.metrics["loss"] == pytest.approx(own_pass[name], rel=1e-4), name
        assert contender.metrics["loss_rows_dropped"] == 0 and contender.loss_seconds > 0

    rendered = [render_prompt(tokenizer, m) for m in prompts["finetune"]]
    assert contenders.reference_answers(tokenizer, rows, prompts["finetune"], rendered) is not None
    assert contenders.reference_answers(tokenizer, rows, prompts["finetune"], [p + [5] for p in rendered]) is None
    monkeypatch.setattr(contenders, "reference_answers", lambda *a: None)
    fallback = evaluate_run(model, tokenizer, rows, train, cfg, FP32, contenders=("finetune",))
    assert len(passes) == 1
    assert fallback.contenders["finetune"].metrics["loss"] == pytest.approx(own_pass["finetune"], rel=1e-4)
    # A model whose cache keeps a window (no cache layer generation can score on): generation scores nothing,
    # and the loss comes from the pass of its own.
    import tunelab.evaluation.generate as gen

    monkeypatch.undo()
    monkeypatch.setattr(contenders, "reference_loss", lambda *a, **k: passes.append(1) or real(*a, **k))
    monkeypatch.setattr(gen, "WHOLE_LAYERS", ())
    windowed = evaluate_run(model, tokenizer, rows, train, cfg, FP32, contenders=("finetune",))
    assert len(passes) == 2
    assert windowed.contenders["finetune"].metrics["loss"] == pytest.approx(own_pass["finetune"], rel=1e-4)
