"""tunelab.data.batches (+ the loss in model.scoring): collation, right padding, length grouping."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.batches import collate, length_grouped_order
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_conversations
from tunelab.model.precision import choose_precision
from tunelab.model.scoring import token_loss_sum, validation_loss


def examples(tokenizer, pairs):
    convs = [Conversation((Message("user", u), Message("assistant", a)), f"t:{i}") for i, (u, a) in enumerate(pairs)]
    out, dropped = tokenize_conversations(tokenizer, convs, max_length=256)
    assert not dropped
    return out


def test_collate_pads_on_the_right():
    a = TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = TokenizedExample([1, 2, 3, 4, 5], [IGNORE_INDEX] * 3 + [4, 5], "b")
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 4, 5]]
    assert batch.input_ids.dtype == torch.long
    assert batch.real_tokens == 8
    assert batch.trained_tokens == 4


def test_padding_changes_no_logit_and_no_loss(tiny_loaded):
    model, tokenizer = tiny_loaded
    short, long = examples(tokenizer, [("yes", "no"), ("the quick brown fox jumps over the lazy dog", "good night")])
    assert len(long.input_ids) > len(short.input_ids)
    pad = tokenizer.pad_token_id
    alone, together = collate([short], pad), collate([short, long], pad)
    n = len(short.input_ids)
    with torch.no_grad():
        logits_alone = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits[0]
        logits_together = model(input_ids=together.input_ids, attention_mask=together.attention_mask).logits[0, :n]
        torch.testing.assert_close(logits_together, logits_alone, rtol=1e-5, atol=1e-6)

        loss_short, n_short = token_loss_sum(model, alone)
        loss_long, n_long = token_loss_sum(model, collate([long], pad))
        loss_both, n_both = token_loss_sum(model, together)
    assert n_both == n_short + n_long == together.trained_tokens
    torch.testing.assert_close(loss_both, loss_short + loss_long, rtol=1e-5, atol=1e-5)


def test_token_loss_equals_full_logits_cross_entropy(tiny_loaded):
    model, tokenizer = tiny_loaded
    batch = collate(examples(tokenizer, [("hello world", "yes"), ("good morning to you", "thank you")]),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        mean = validation_loss(model, [batch], choose_precision("fp32"))
    torch.testing.assert_close(loss_sum, reference, rtol=1e-5, atol=1e-5)
    assert mean == pytest.approx(float(reference) / n, rel=1e-5)


def test_length_grouped_order_is_a_permutation_in_batches():
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    order = length_grouped_order(lengths, batch_size=8, generator=torch.Generator().manual_seed(0), window=4)
    flat = [i for b in order for i in b]
    assert sorted(flat) == list(range(203))
    assert all(1 <= len(b) <= 8 for b in order)
    assert sum(len(b) < 8 for b in order) <= -(-203 // 32)  # at most one short batch per window
    # each batch holds similar lengths: much less spread than random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in order) / len(order)
    assert spread < 15
    again = length_grouped_order(lengths, batch_size=8, generator=torch.Generator().manual_seed(0), window=4)
    assert again == order
    other = length_grouped_order(lengths, batch_size=8, generator=torch.Generator().manual_seed(1), window=4)
    assert other != order


def test_length_grouped_order_puts_the_largest_batch_first():
    # The first step holds the most padded tokens, so a run that cannot fit fails at once and later steps
    # reuse the memory it took. Short examples in full batches, one long example somewhere.
    lengths = [10 + (i * 7) % 20 for i in range(100)]
    lengths[57] = 120
    for seed in range(5):
        order = length_grouped_order(lengths, batch_size=8, generator=torch.Generator().manual_seed(seed), window=2)
        size = [len(b) * max(lengths[i] for i in b) for b in order]
        assert 57 in order[0]
        assert size[0] == max(size)
        assert sorted(i for b in order for i in b) == list(range(100))
    # Equal widths: the full batch beats the short last batch of a window.
    order = length_grouped_order([5] * 20, batch_size=8, generator=torch.Generator().manual_seed(0), window=2)
    assert len(order[0]) == 8
