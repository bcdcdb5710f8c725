"""tunelab.training.step: accumulation and several processes give one big batch's gradient; the optimizer."""

from __future__ import annotations

import pytest
import torch

from helpers import lora_grads_and_zero, lora_with_random_adapter, sft_loss, varied_examples
from tunelab.data.batches import collate
from tunelab.model.precision import choose_precision
from tunelab.training.step import backward_on


def test_accumulation_1x4_equals_4x1(tiny_model_dir):
    model, tokenizer = lora_with_random_adapter(tiny_model_dir, seed=0)
    precision = choose_precision("fp32")
    exs = varied_examples(tokenizer)
    pad = tokenizer.pad_token_id

    loss_big, *_ = backward_on(sft_loss(model), [collate(exs, pad)], precision)
    big = lora_grads_and_zero(model)
    loss_acc, *_ = backward_on(sft_loss(model), [collate([e], pad) for e in exs], precision)
    acc = lora_grads_and_zero(model)

    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    assert big.keys() == acc.keys() and len(big) == 2 * 7 * 2  # A and B, 7 linear layers, 2 blocks
    for name in big:
        assert big[name].abs().max() > 0, name
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-7, msg=name)

    # The normalisation matters with these examples: averaging per-micro-batch means would differ.
    naive = 0.0
    for e in exs:
        naive += backward_on(sft_loss(model), [collate([e], pad)], precision)[0] / len(exs)
    model.zero_grad(set_to_none=True)
    assert abs(naive - loss_big) > 1e-3


def test_optimizer_is_fused_and_updates_like_the_plain_adamw():
    """make_optimizer's fused AdamW (one kernel for all tensors) gives the per-tensor AdamW's update."""
    from tunelab.training.step import make_optimizer

    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, _ = make_optimizer(models[0], 1e-2, 0.1, total_steps=10, warmup_steps=0)
    plain = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain)):
            model(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(models[0][0].weight, torch.nn.Linear(6, 5).weight)
