"""tunelab.training.objectives.dpo: sequence log-probs, the DPO loss, its statistics and validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import PAIRS, chosen_rejected_rows, write_jsonl
from tunelab.config import DataConfig, LoraConfig
from tunelab.data.pairs import PairBatch, collate_pairs
from tunelab.data.prepare import prepare_preference_data
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.model.load import attach_lora, load_model, resolve_model
from tunelab.model.precision import choose_precision
from tunelab.model.scoring import sequence_logprobs
from tunelab.training.objectives.dpo import Dpo, DpoStats, dpo_loss_sum, reference_logprobs, require_adapter

BETA = 0.1

def dpo_validation(model, batches: list[PairBatch], beta: float, precision) -> dict[str, float]:
    """The DPO objective's validation, as the recipe runs it (sums, then means)."""
    objective = Dpo(beta=beta)
    means = objective.validation_metrics(objective.validation_sums(model, batches, precision))
    return {key.removeprefix("val_"): value for key, value in means.items()}


def peft_model(tiny_model_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    model, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    return attach_lora(model, LoraConfig(rank=4, alpha=8)), tokenizer


def all_pairs(tokenizer, tmp_path: Path, pairs=PAIRS):
    """Every pair tokenized, validation and test included (split 1/0/0)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", chosen_rejected_rows(pairs))
    data = prepare_preference_data(DataConfig(path=path, format="chosen_rejected", split=(1.0, 0.0, 0.0)),
                                   tokenizer, val_rows=0)
    return data.train


def full_logits_logprobs(model, batch) -> torch.Tensor:
    """The plain computation: full (R, T, vocab) logits, log_softmax, gather at the labels."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (R, T-1, vocab)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (R, T-1)
    return (picked * keep).sum(1)


def lora_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


# ---------------------------------------------------------------- loss


def test_at_initialisation_policy_equals_reference(tiny_model_dir, tmp_path):
    model, tokenizer = peft_model(tiny_model_dir)
    pairs = all_pairs(tokenizer, tmp_path)
    pb = collate_pairs(pairs, tokenizer.pad_token_id)
    assert pb.pairs == len(PAIRS) and pb.batch.input_ids.shape[0] == 2 * len(PAIRS)
    loss, stats = dpo_loss_sum(model, pb, BETA)
    assert loss.item() == pytest.approx(len(PAIRS) * math.log(2), abs=1e-6)
    mean = stats.mean()
    assert mean["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert mean["reward_margin"] == 0 and mean["chosen_reward"] == 0 and mean["rejected_reward"] == 0
    assert mean["reward_accuracy"] == 0 and stats.pairs == len(PAIRS)


def test_training_makes_the_loss_fall_and_the_margin_rise(tiny_model_dir, tmp_path):
    model, tokenizer = peft_model(tiny_model_dir)
    pb = collate_pairs(all_pairs(tokenizer, tmp_path)[:4], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    history = []
    for _ in range(30):
        loss, stats = dpo_loss_sum(model, pb, BETA)
        (loss / pb.pairs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(stats.mean())
    after = dpo_validation(model, [pb], BETA, choose_precision("fp32"))
    assert model.training  # restored
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["loss"] < 0.4 and after["loss"] < history[-1]["loss"] < history[10]["loss"] < history[0]["loss"]
    assert after["reward_margin"] > 1.0 > history[0]["reward_margin"]  # measured: 0 -> ~2.2
    assert after["reward_accuracy"] == 1.0 > history[0]["reward_accuracy"]
    _, stats = dpo_loss_sum(model, pb, BETA)
    assert stats.chosen_reward > stats.rejected_reward


@pytest.mark.parametrize("share_prefix", [True, False])
def test_sequence_logprobs_equal_the_full_logits_computation(tiny_model_dir, tmp_path, share_prefix):
    model, tokenizer = peft_model(tiny_model_dir)
    for p in lora_params(model):  # a non-zero adapter, so the policy differs from the base
        torch.nn.init.normal_(p, std=0.2)
    pairs = all_pairs(tokenizer, tmp_path)
    pb = collate_pairs(pairs, tokenizer.pad_token_id)
    if not share_prefix:
        pb.batch.shared_prefix = 0
    assert (pb.batch.shared_prefix > 0) == share_prefix  # both branches of the body really run
    assert (pb.batch.attention_mask == 0).any()  # rows of different lengths: right padding
    with torch.no_grad():
        ours = sequence_logprobs(model, pb.batch)
        plain = full_logits_logprobs(model, pb.batch)
    assert ours.shape == (2 * len(pairs),)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-4)
    # and a row alone (no padding) gives the same value as inside the padded batch
    with torch.no_grad():
        alone = sequence_logprobs(model, collate_pairs(pairs[:1], tokenizer.pad_token_id).batch)
    torch.testing.assert_close(alone, ours[[0, len(pairs)]], rtol=1e-5, atol=1e-4)


def test_reference_ignores_the_adapter_and_gets_no_gradient(tiny_model_dir, tmp_path):
    model, tokenizer = peft_model(tiny_model_dir)
    pb = collate_pairs(all_pairs(tokenizer, tmp_path), tokenizer.pad_token_id)
    ref_before = reference_logprobs(model, pb.batch)
    policy_before = sequence_logprobs(model, pb.batch).detach()
    torch.testing.assert_close(ref_before, policy_before, rtol=0, atol=0)  # adapter output is zero at init
    for p in lora_params(model):
        torch.nn.init.normal_(p, std=0.2)
    ref_after = reference_logprobs(model, pb.batch)
    assert not ref_after.requires_grad
    assert torch.equal(ref_after, ref_before)
    assert not torch.allclose(sequence_logprobs(model, pb.batch), policy_before)
    # the adapter is back on after the reference pass, and the loss's gradient reaches only the adapter
    loss, _ = dpo_loss_sum(model, pb, BETA)
    loss.backward()
    assert all(p.grad is not None for p in lora_params(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_accumulation_over_two_micro_batches_equals_one_batch(tiny_model_dir, tmp_path):
    model, tokenizer = peft_model(tiny_model_dir)
    for p in lora_params(model):
        torch.nn.init.normal_(p, std=0.1)
    pairs = all_pairs(tokenizer, tmp_path)[:4]
    pad = tokenizer.pad_token_id

    def grads(micro: list[PairBatch]) -> tuple[list[torch.Tensor], DpoStats]:
        model.zero_grad(set_to_none=True)
        step_pairs = sum(pb.pairs for pb in micro)
        total = DpoStats()
        for pb in micro:
            loss, stats = dpo_loss_sum(model, pb, BETA)
            (loss / step_pairs).backward()
            total = total + stats
        return [p.grad.clone() for p in lora_params(model)], total

    one, one_stats = grads([collate_pairs(pairs, pad)])
    two, two_stats = grads([collate_pairs(pairs[:2], pad), collate_pairs(pairs[2:], pad)])
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key, value in one_stats.mean().items():
        assert two_stats.mean()[key] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_dpo_needs_an_adapter(tiny_loaded):
    model, _ = tiny_loaded
    with pytest.raises(TunelabError, match="tuning: lora"):
        require_adapter(model)


def test_validation_restores_eval_mode_too(tiny_model_dir, tmp_path):
    model, tokenizer = peft_model(tiny_model_dir)
    pb = collate_pairs(all_pairs(tokenizer, tmp_path)[:2], tokenizer.pad_token_id)
    model.eval()
    out = dpo_validation(model, [pb], BETA, choose_precision("fp32"))
    assert not model.training
    assert set(out) >= {"loss", "reward_margin", "reward_accuracy"}
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-6)
