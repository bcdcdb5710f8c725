"""tunelab.model.kernels.prefix: a prompt prefix every row shares, computed once, gives the loss and the gradients
of every row computed whole, on each of its paths."""

from __future__ import annotations

import pytest
import torch

from helpers import lora_grads_and_zero, lora_with_random_adapter, sft_loss, varied_examples
from tunelab.data.batches import collate
from tunelab.data.tokenize import TokenizedExample
from tunelab.model.precision import choose_precision
from tunelab.training.step import backward_on


def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_model_dir):
    """Computing the common prefix once per batch is an optimisation, not a change of the loss."""
    model, tokenizer = lora_with_random_adapter(tiny_model_dir, seed=1)
    precision = choose_precision("fp32")
    exs = varied_examples(tokenizer)  # all start with the template's default system prompt
    pad = tokenizer.pad_token_id

    shared = collate(exs, pad)
    plain = collate(exs, pad, share_prefix=False)
    assert shared.shared_prefix >= 4 and plain.shared_prefix == 0
    # the prefix stops before any position that predicts a trained token
    assert (shared.labels[:, : shared.shared_prefix + 1] == -100).all()

    loss_shared, *_ = backward_on(sft_loss(model), [shared], precision)
    g_shared = lora_grads_and_zero(model)
    loss_plain, *_ = backward_on(sft_loss(model), [plain], precision)
    g_plain = lora_grads_and_zero(model)
    assert loss_shared == pytest.approx(loss_plain, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_shared_prefix_when_rows_differ_from_the_start(tiny_tokenizer):
    from tunelab.data.batches import shared_prefix_length

    a = TokenizedExample([1, 2, 3, 4, 5, 6, 7], [-100] * 5 + [6, 7], "a")
    b = TokenizedExample([1, 2, 3, 4, 5, 9, 9, 7], [-100] * 6 + [9, 7], "b")
    assert shared_prefix_length([a, b]) == 4  # 5 tokens in common, but position 4 predicts a's first trained token
    c = TokenizedExample([8, 2, 3, 4, 5, 6, 7], [-100] * 5 + [6, 7], "c")
    assert shared_prefix_length([a, c]) == 0
    assert shared_prefix_length([a]) == 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("room", [True, False], ids=["in-a-row's-padding", "as-one-more-row"])
def test_prefix_in_batch_and_cached_prefix_equal_the_plain_forward(tiny_model_dir, monkeypatch, packed, room):
    """Both ways of computing the shared prefix once (inside the same forward, in a row's padding or as one
    more row; or a forward of its own into a KV cache) give the plain forward's loss and gradients."""
    from tunelab.data.pack import collate_packed
    from tunelab.model import scoring
    from tunelab.model.kernels import attention

    model, tokenizer = lora_with_random_adapter(tiny_model_dir, seed=3)
    exs, pad = varied_examples(tokenizer), tokenizer.pad_token_id
    if not room:  # rows without trailing padding: the longest example twice, differing from token 8 on
        longest = max(exs, key=lambda e: len(e.input_ids))
        other = list(longest.input_ids)
        assert longest.labels[8] == -100  # a prompt token
        other[8] = (other[8] + 1) % model.config.vocab_size
        exs = [longest, TokenizedExample(other, longest.labels, "other")]
    elif packed:  # remainders of 10 and 43 tokens after the 27-token prefix: the 10's row has room for it
        exs = [min(exs, key=lambda e: len(e.input_ids)), max(exs, key=lambda e: len(e.input_ids))]
    batch = collate_packed(exs, pad) if packed else collate(exs, pad)
    plain = collate(exs, pad, share_prefix=False)
    p, t = batch.shared_prefix, batch.input_ids.shape[1]
    assert 4 <= p <= t - p and (batch.segment_ids is not None) == packed

    slots, forwards = [], []
    real_slot = attention.prefix_in_batch
    monkeypatch.setattr(attention, "prefix_in_batch", lambda *a: slots.append(a) or real_slot(*a))
    hook = model.get_base_model().model.register_forward_hook(lambda *a: forwards.append(1))

    def loss_and_grads(b):
        model.zero_grad()
        forwards.clear()
        loss, _ = scoring.token_loss_sum(model, b)
        loss.backward()
        return float(loss), lora_grads_and_zero(model)

    expected_loss, expected_grads = loss_and_grads(plain)
    for in_batch in (True, False):
        if not in_batch:  # the other attention implementations take the KV-cache path
            monkeypatch.setattr(attention, "NAME", "not-" + attention.NAME)
        loss, grads = loss_and_grads(batch)
        assert len(forwards) == (1 if in_batch else 2)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for name in expected_grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    hook.remove()
    ((row, column, length, width),) = slots
    assert width == batch.input_ids.shape[1] - p
    rows = batch.input_ids.shape[0]
    assert length == p and (row < rows and column > 0 if room else (row, column) == (rows, 0))


def test_a_sliding_window_shorter_than_the_rows_keeps_the_kv_cache_path(tiny_model_dir):
    """The in-batch prefix builds its own full causal masks; a model with a short sliding window needs
    transformers' masks, so its prefix goes through the KV cache (two forwards), with the same loss."""
    from tunelab.model import scoring

    model, tokenizer = lora_with_random_adapter(tiny_model_dir, seed=3)
    batch = collate(varied_examples(tokenizer), tokenizer.pad_token_id)
    body = model.get_base_model().model
    forwards = []
    hook = body.register_forward_hook(lambda *a: forwards.append(1))
    losses = {}
    for window in (None, batch.input_ids.shape[1], batch.input_ids.shape[1] - 1):
        body.config.sliding_window = window
        forwards.clear()
        with torch.no_grad():
            losses[window] = float(scoring.token_loss_sum(model, batch)[0])
        assert len(forwards) == (2 if window == batch.input_ids.shape[1] - 1 else 1), window
    hook.remove()
    assert len({round(v, 4) for v in losses.values()}) == 1  # Llama ignores the window: the paths agree
