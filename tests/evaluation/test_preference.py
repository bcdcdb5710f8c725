"""tunelab.evaluation.preference: a DPO run's held-out evaluation counts, for the fine-tune and the base, how
often each gives the chosen answer the higher log-probability, and compares them like any evaluation."""

from __future__ import annotations

import torch

from tunelab.config import EvalConfig, LoraConfig
from tunelab.data.pairs import collate_pairs, tokenize_pairs
from tunelab.data.records import Message, PreferencePair
from tunelab.evaluation.preference import evaluate_preferences
from tunelab.model.load import attach_lora, load_model, resolve_model
from tunelab.model.precision import choose_precision
from tunelab.model.scoring import sequence_logprobs

FP32 = choose_precision("fp32")


def pairs(n: int) -> list[PreferencePair]:
    answers = [("four", "maybe"), ("hello world", "no"), ("card_arrival", "refund"), ("yes", "good night")]
    out = []
    for i in range(n):
        chosen, rejected = answers[i % len(answers)]
        out.append(PreferencePair((Message("user", f"what is two plus two {i}"),), (Message("assistant", chosen),),
                                  (Message("assistant", rejected),), f"pairs.jsonl:{i + 1}"))
    return out


def test_preferences_of_both_models_counted_on_the_same_pairs_and_compared(tiny_model_dir):
    torch.manual_seed(0)
    base, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # an adapter that changes the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    rows = pairs(24)
    cfg = EvalConfig(batch_size=5, forgetting_probe=False)
    result = evaluate_preferences(model, tokenizer, rows, cfg, FP32)

    assert result.task == "preference" and result.metric == "preference_accuracy" and result.test_rows == 24
    assert set(result.contenders) == {"finetune", "base_zero_shot"} and set(result.comparisons) == {"base_zero_shot"}
    # Each contender's preferences, computed here without the evaluation's batching.
    tokenized, _ = tokenize_pairs(tokenizer, rows, 4096)
    model.eval()
    for name, weights in (("finetune", None), ("base_zero_shot", model.disable_adapter)):
        with torch.no_grad(), (weights() if weights else torch.no_grad()):
            logp = sequence_logprobs(model, collate_pairs(tokenized, tokenizer.pad_token_id).batch)
        margins = (logp[:24] - logp[24:]).tolist()
        c = result.contenders[name]
        assert c.correct == [m > 0 for m in margins], name
        assert c.metrics["preference_accuracy"] == sum(m > 0 for m in margins) / 24
        assert abs(c.metrics["margin_mean"] - sum(margins) / 24) < 1e-4
        assert c.predictions == ["chosen" if m > 0 else "rejected" for m in margins]
        low, high = c.ci["preference_accuracy"]
        assert low <= c.metrics["preference_accuracy"] <= high
    comparison = result.comparisons["base_zero_shot"]
    ft, base_right = result.contenders["finetune"].correct, result.contenders["base_zero_shot"].correct
    assert comparison.test == "mcnemar" and comparison.metric == "preference_accuracy"
    assert comparison.wins == sum(a and not b for a, b in zip(ft, base_right))
    ft_margin = result.contenders["finetune"].metrics["margin_mean"]
    assert abs(ft_margin - result.contenders["base_zero_shot"].metrics["margin_mean"]) > 0.1  # the adapter counts
    assert comparison.win_examples == [] or comparison.win_examples[0].reference in {"four", "hello world",
                                                                                     "card_arrival", "yes"}


def test_no_pairs_no_comparison():
    result = evaluate_preferences(None, None, [], EvalConfig(), FP32)  # nothing to score: nothing loaded either
    assert result.test_rows == 0 and result.comparisons == {}
