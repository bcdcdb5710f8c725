"""tunelab.evaluate.compare: fine-tune vs prompted base on the same rows."""

from __future__ import annotations

import torch

from tunelab.config import EvalConfig
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import render_prompt
from tunelab.evaluate.compare import base_prompt_messages, evaluate_classification
from tunelab.evaluate.generate import generate
from tunelab.train.loop import choose_precision

FP32 = choose_precision("fp32")


def test_base_prompt_lists_labels_and_keeps_the_rows_system_prompt():
    conv = Conversation(
        (Message("system", "Classify the intent."), Message("user", "where is my card"), Message("assistant", "card_arrival")),
        "t:1",
    )
    msgs = base_prompt_messages(conv, ["card_arrival", "refund"])
    assert [m.role for m in msgs] == ["system", "user"]
    assert msgs[0].content.startswith("Classify the intent.\n")
    assert "card_arrival, refund" in msgs[0].content
    assert msgs[1] == Message("user", "where is my card")
    no_system = Conversation((Message("user", "hi"), Message("assistant", "refund")), "t:2")
    assert base_prompt_messages(no_system, ["refund"])[0].content.endswith("Labels: refund")


def test_evaluate_classification_on_the_tiny_model(trained_run):
    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows = result.data.split.test + result.data.split.validation
    labels = sorted({c.answer for c in rows + result.data.split.train})
    cfg = EvalConfig(max_rows=10, batch_size=3, max_new_tokens=5)
    out = evaluate_classification(model, tokenizer, rows, labels, cfg, FP32)

    assert out["task"] == "classification"
    assert out["test_rows"] == 10 and out["labels"] == len(labels) == 5
    for name in ("finetune", "base_prompted"):
        r = out[name]
        assert r["n"] == 10
        assert 0.0 <= r["accuracy"] <= 1.0
        low, high = r["accuracy_ci"]
        assert 0.0 <= low <= r["accuracy"] <= high <= 1.0
        assert r["correct"] == round(r["accuracy"] * 10)
        assert [e["reference"] for e in r["examples"]] == [c.answer for c in rows[:10]]
    assert out["base_prompted"]["prompt_tokens_mean"] > out["finetune"]["prompt_tokens_mean"]

    # The contenders really are the adapter and the base with the adapter off, on the same rows.
    ft_prompts = [render_prompt(tokenizer, r.prompt_messages) for r in rows[:10]]
    base_prompts = [render_prompt(tokenizer, base_prompt_messages(r, labels)) for r in rows[:10]]
    ft = generate(model, tokenizer, ft_prompts, max_new_tokens=5, batch_size=10, precision=FP32)
    with model.disable_adapter():
        base = generate(model, tokenizer, base_prompts, max_new_tokens=5, batch_size=10, precision=FP32)
    for name, run in (("finetune", ft), ("base_prompted", base)):
        predictions = [e["prediction"] for e in out[name]["examples"]]
        # evaluation may end an answer at its first newline (a label is one line): compare that line
        assert all(p in (g.text, g.text.split("\n")[0]) for p, g in zip(predictions, run.generations, strict=True)), name
    assert out["finetune"]["prompt_tokens_mean"] == sum(map(len, ft_prompts)) / 10

    # ...and evaluation leaves the adapter switched on.
    ids = torch.tensor([ft_prompts[0]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-2


def test_accuracy_counts_correct_predictions(trained_run):
    """Rows whose reference is what the fine-tune actually says must score 100%."""
    result = trained_run.result
    model, tokenizer = result.model, result.tokenizer
    rows = result.data.split.test
    prompts = [render_prompt(tokenizer, r.prompt_messages) for r in rows]
    said = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=4, precision=FP32).generations]
    # one-line, non-empty answers only, so that any first-line rule of the evaluation cannot matter
    relabelled = [Conversation((*r.prompt_messages, Message("assistant", s)), r.source)
                  for r, s in zip(rows, said) if s.strip() and "\n" not in s]
    assert len(relabelled) >= 2
    labels = sorted({c.answer for c in relabelled})
    out = evaluate_classification(model, tokenizer, relabelled, labels, EvalConfig(max_new_tokens=3, compare_base=False), FP32)
    assert "base_prompted" not in out
    assert out["finetune"]["correct"] == out["finetune"]["n"] == len(relabelled)
    assert out["finetune"]["accuracy"] == 1.0
