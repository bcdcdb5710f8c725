"""tunelab.data.pack: packing changes the layout of a micro-batch, never its loss or gradients.

Every model check runs the tiny Llama (fp32, eval mode) under each attention
implementation we may use: ours ("tunelab_gqa", eager mask), "eager" and "sdpa".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.batches import Batch, collate
from tunelab.data.pack import collate_packed, pack_layout, pack_summary, packed_rows
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.errors import TunelabError
from tunelab.model.scoring import token_loss_sum

IMPLEMENTATIONS = ["tunelab_gqa", "eager", "sdpa"]
# None (the default): rows as wide as the longest example (12 tokens); 16: wider, several per row; 64: one row.
PACK_LENGTHS = [None, 16, 64]
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 sums of ~10 cross-entropies of ~6 nats
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def make_examples(vocab: int, pad_id: int) -> list[TokenizedExample]:
    """A micro-batch with prompt/answer examples, a fully trained one, and a one-token one."""
    g = torch.Generator().manual_seed(0)
    shapes = [(11, 4), (3, 2), (7, 7), (5, 1), (12, 5), (2, 1), (6, 3), (1, 1), (9, 4)]  # (length, trained tail)
    out = []
    for k, (n, trained) in enumerate(shapes):
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[ids == pad_id] = (pad_id + 1) % vocab  # keep the pad id for pads, so a mix-up would show
        ids = ids.tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (n - trained) + ids[n - trained :], f"e{k}"))
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """One fp32 copy of the tiny Llama per attention implementation, with the loaded config (use_cache=True)."""
    from transformers import AutoModelForCausalLM

    import tunelab.model.kernels.attention  # noqa: F401  (registers "tunelab_gqa")

    return {
        impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=impl).eval()
        for impl in IMPLEMENTATIONS
    }


@pytest.fixture(scope="module")
def batch_examples(tiny_tokenizer) -> tuple[list[TokenizedExample], int]:
    return make_examples(len(tiny_tokenizer), tiny_tokenizer.pad_token_id), tiny_tokenizer.pad_token_id


def spans(examples: list[TokenizedExample], pack_length: int | None | str) -> list[tuple[int, int, int]]:
    """(row, start, length) of each example, in input order; pack_length "plain" means plain `collate`."""
    if pack_length == "plain":
        return [(i, 0, len(e.input_ids)) for i, e in enumerate(examples)]
    where: dict[int, tuple[int, int, int]] = {}
    for r, row in enumerate(packed_rows([len(e.input_ids) for e in examples], pack_length)[0]):
        start = 0
        for i in row:
            where[i] = (r, start, len(examples[i].input_ids))
            start += len(examples[i].input_ids)
    return [where[i] for i in range(len(examples))]


def logits_of(model, batch: Batch) -> torch.Tensor:
    """(B, T, vocab), called the way each layout is meant to be: packed with positions and no 2D mask."""
    if batch.position_ids is not None:
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def per_example_loss(model, batch: Batch, where: list[tuple[int, int, int]]) -> torch.Tensor:
    """(N,) sum of CE over each example's trained tokens, read from its own span of its row."""
    logits = logits_of(model, batch)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], reduction="none")  # (B, T-1), 0 if ignored
    ce = F.pad(ce, (0, 1))  # (B, T): ce[:, t] is position t predicting token t+1
    # The span includes the example's last position, which in a packed row faces the next example's first
    # token: it must contribute 0, as it does unpacked (where it faces a pad).
    return torch.stack([ce[r, s : s + n].sum() for r, s, n in where])


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_sum_and_gradients(model, plain: Batch, packed: Batch) -> int:
    """`token_loss_sum` of both layouts: equal sums, trained-token counts and gradients; returns the count."""
    results = []
    for batch in (plain, packed):
        model.zero_grad(set_to_none=True)
        loss, n = token_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), n, grads(model)))
    model.zero_grad(set_to_none=True)
    (plain_loss, n_plain, plain_grads), (packed_loss, n_packed, packed_grads) = results
    assert n_packed == n_plain
    torch.testing.assert_close(packed_loss, plain_loss, **LOSS_TOL)
    assert packed_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")
    return n_plain


@pytest.mark.parametrize("pack_length", PACK_LENGTHS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_packed_loss_and_gradients_equal_unpacked(models, batch_examples, impl, pack_length):
    model = models[impl]
    examples, pad = batch_examples
    results = []
    for layout in ("plain", pack_length):
        batch = collate(examples, pad, share_prefix=False) if layout == "plain" else collate_packed(examples, pad, layout)
        model.zero_grad(set_to_none=True)
        losses = per_example_loss(model, batch, spans(examples, layout))  # (N,)
        losses.sum().backward()
        results.append((losses.detach(), grads(model)))
    (plain, plain_grads), (packed, packed_grads) = results
    assert plain.gt(0).sum() == sum(e.trained_tokens > 0 and len(e.input_ids) > 1 for e in examples)
    torch.testing.assert_close(packed, plain, **LOSS_TOL)
    assert packed_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_token_loss_sum_of_packed_batch_equals_unpacked(models, batch_examples, impl):
    """The invariant the training loop relies on, through `token_loss_sum` itself and the config as loaded."""
    model = models[impl]
    examples, pad = batch_examples
    assert model.config.use_cache  # as load_model leaves it: the loss must not depend on this
    n = assert_same_loss_sum_and_gradients(model, collate(examples, pad, share_prefix=False),
                                           collate_packed(examples, pad, 16))
    assert n == sum(e.trained_tokens for e in examples) - sum(e.labels[0] != IGNORE_INDEX for e in examples)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_changing_one_example_changes_no_logit_of_another(models, batch_examples, impl):
    model = models[impl]
    examples, pad = batch_examples
    where = spans(examples, 16)
    base = collate_packed(examples, pad, 16)
    shared_rows = [r for r in range(base.input_ids.shape[0]) if sum(w[0] == r for w in where) > 1]
    assert shared_rows, "the test needs a row holding several examples"
    with torch.no_grad():
        before = logits_of(model, base)  # (B, T, vocab)
        for k, (r, s, n) in enumerate(where):
            if r not in shared_rows:
                continue
            changed = collate_packed(examples, pad, 16)
            changed.input_ids[r, s : s + n] = (changed.input_ids[r, s : s + n] + 7) % model.config.vocab_size
            after = logits_of(model, changed)
            assert not torch.equal(after[r, s : s + n], before[r, s : s + n])  # the change is visible where it is
            for j, (r2, s2, n2) in enumerate(where):
                if j != k:  # masked keys get exactly zero weight, so every other logit is bit-for-bit the same
                    assert torch.equal(after[r2, s2 : s2 + n2], before[r2, s2 : s2 + n2]), (examples[k].source, j)
        # Pads are a block of their own: changing them changes no real token's logit either.
        repadded = collate_packed(examples, pad + 1, 16)
        real = base.attention_mask.bool()
        assert torch.equal(logits_of(model, repadded)[real], before[real])


@pytest.mark.parametrize("pack_length", PACK_LENGTHS)
def test_packed_batch_keeps_every_example_and_token_count(batch_examples, pack_length):
    examples, pad = batch_examples
    plain, packed = collate(examples, pad, share_prefix=False), collate_packed(examples, pad, pack_length)
    assert packed.real_tokens == plain.real_tokens
    assert packed.trained_tokens == plain.trained_tokens
    assert packed.shared_prefix == 0
    assert packed.position_ids.shape == packed.input_ids.shape == packed.labels.shape == packed.attention_mask.shape
    longest = max(len(e.input_ids) for e in examples)
    assert packed.input_ids.shape[1] <= max(pack_length or 0, longest)
    if pack_length is None:  # the default: rows exactly as wide as the longest example
        assert packed.input_ids.shape[1] == longest
    # Cut each row where positions restart: every real segment is one example, each exactly once.
    found = []
    for r in range(packed.input_ids.shape[0]):
        starts = (packed.position_ids[r] == 0).nonzero().flatten().tolist() + [packed.input_ids.shape[1]]
        for s, e in zip(starts, starts[1:]):
            if packed.attention_mask[r, s] == 0:  # the pad run: last, all pads, never trained
                assert e == packed.input_ids.shape[1] and packed.attention_mask[r, s:].sum() == 0
                assert (packed.input_ids[r, s:] == pad).all() and (packed.labels[r, s:] == IGNORE_INDEX).all()
                continue
            assert packed.position_ids[r, s:e].tolist() == list(range(e - s))
            found.append((packed.input_ids[r, s:e].tolist(), packed.labels[r, s:e].tolist()))
        # A row holds at most pack_length tokens, or as many as the longest example where that is longer.
        assert sum(packed.attention_mask[r].tolist()) <= max(pack_length or 0, longest)
    expected = [(e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in examples]
    assert sorted(found) == sorted(expected)


def test_worked_example_of_the_docstring():
    a = TokenizedExample([11, 12, 13, 14, 15], [-100, -100, 13, 14, 15], "A")
    b = TokenizedExample([21, 22, 23], [21, 22, 23], "B")
    c = TokenizedExample([31, 32, 33, 34], [-100, -100, 33, 34], "C")
    batch = collate_packed([a, b, c], pad_id=0, pack_length=8)
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23], [31, 32, 33, 34, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch.labels.tolist() == [[-100, -100, 13, 14, 15, -100, 22, 23], [-100, -100, 33, 34, -100, -100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert pack_layout([5, 3, 4], 8) == [[0, 1], [2]]


def test_layout_is_first_fit_decreasing_and_deterministic():
    assert pack_layout([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]  # ties keep input order
    assert pack_layout([3, 9, 5, 2], 8) == [[1], [2, 0], [3]]  # 9 > 8: its own row, which stays closed
    assert pack_layout([2, 2, 2], 1) == [[0], [1], [2]]
    with pytest.raises(TunelabError, match="pack_length is 0"):
        pack_layout([3], 0)


def test_rows_fill_up_to_the_longest_example_when_it_is_wider_than_pack_length():
    # 9 > 8 widens the batch to 9 anyway: rows of at most 9 hold 4 + 3 + 2 in one row, not [4, 3] and [2].
    assert packed_rows([9, 4, 3, 2], 8) == ([[0], [1, 2, 3]], 9)
    assert packed_rows([9, 4, 3, 2], None) == ([[0], [1, 2, 3]], 9)
    assert packed_rows([9, 4, 3, 2], 16) == ([[0, 1, 2], [3]], 16)
    ex = [TokenizedExample(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1)), str(n)) for n in (9, 4, 3, 2)]
    assert collate_packed(ex, 0, 8).input_ids.shape == (2, 9)
    # Behind a shared prefix the remainders are packed: prefix 1 + remainders [8, 3, 2, 1] -> [8], [3, 2, 1].
    assert packed_rows([9, 4, 3, 2], None, prefix=1) == ([[0], [1, 2, 3]], 9)


def test_pack_summary_reports_fill():
    ex = [TokenizedExample([1] * n, [1] * n, str(n)) for n in (5, 3, 4)]
    summary = pack_summary([ex, ex[:1]], pack_length=8)
    # micro-batch 1: rows [5+3], [4] of width 8 -> 16 slots (unpacked 3 x 5); micro-batch 2: one row of 5
    assert (summary.micro_batches, summary.examples, summary.rows) == (2, 4, 3)
    assert (summary.real_tokens, summary.packed_slots, summary.padded_slots) == (17, 21, 20)
    assert summary.fill == pytest.approx(17 / 21)
    assert "3 rows" in summary.describe()


@pytest.mark.parametrize("pack_length", [None, 12, 24])
def test_pack_summary_counts_what_collate_packed_lays_out(prefixed_examples, pack_length):
    examples, pad = prefixed_examples
    for share_prefix in (True, False):
        packed = collate_packed(examples, pad, pack_length, share_prefix=share_prefix)
        summary = pack_summary([examples], pack_length, share_prefix=share_prefix)
        assert summary.rows == packed.input_ids.shape[0]
        assert summary.packed_slots == packed.input_ids.numel()
        assert summary.real_tokens == int(packed.attention_mask.sum())  # the prefix once per row


PREFIX = [3, 4, 5, 6, 7]  # a "system prompt" every example starts with, never trained


@pytest.fixture(scope="module")
def prefixed_examples(tiny_tokenizer) -> tuple[list[TokenizedExample], int]:
    """The micro-batch above, each example behind PREFIX and trained only after it (as chat data is)."""
    examples = make_examples(len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    out = []
    for e in examples:
        labels = [IGNORE_INDEX] * len(PREFIX) + [IGNORE_INDEX] + e.labels[1:]  # the first token after it: a prompt token
        out.append(TokenizedExample(PREFIX + e.input_ids, labels, e.source))
    return out, tiny_tokenizer.pad_token_id


@pytest.mark.parametrize("pack_length", [None, 12, 24, 100])
def test_rows_packed_behind_a_shared_prefix_keep_every_example(prefixed_examples, pack_length):
    examples, pad = prefixed_examples
    plain, packed = collate(examples, pad, share_prefix=False), collate_packed(examples, pad, pack_length)
    p = len(PREFIX)
    assert packed.shared_prefix == p and plain.shared_prefix == 0
    assert packed.real_tokens == plain.real_tokens == sum(len(e.input_ids) for e in examples)  # prefix per example
    assert packed.trained_tokens == plain.trained_tokens
    assert (packed.input_ids[:, :p] == torch.tensor(PREFIX)).all() and (packed.segment_ids[:, :p] == -1).all()
    assert packed.position_ids[:, :p].tolist() == [list(range(p))] * packed.input_ids.shape[0]
    found = []
    for r in range(packed.input_ids.shape[0]):
        seg = packed.segment_ids[r]
        for k in range(1, int(seg.max()) + 1):
            cols = (seg == k).nonzero().flatten()
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))  # one contiguous span
            assert packed.position_ids[r, cols].tolist() == list(range(p, p + len(cols)))  # continuing the prefix
            found.append((PREFIX + packed.input_ids[r, cols].tolist(),
                          [IGNORE_INDEX] * p + packed.labels[r, cols].tolist()))
        pads = seg == 0
        assert (packed.input_ids[r, pads] == pad).all() and packed.attention_mask[r, pads].sum() == 0
    assert sorted(found) == sorted((e.input_ids, e.labels) for e in examples)
    rows_alone = collate_packed(examples, pad, pack_length, share_prefix=False)
    assert rows_alone.segment_ids is None and rows_alone.shared_prefix == 0  # FSDP's layout: the plain packing


@pytest.mark.parametrize("pack_length", [None, 12, 24, 100])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_packed_behind_prefix_loss_and_gradients_equal_unpacked(models, prefixed_examples, impl, pack_length):
    model = models[impl]
    examples, pad = prefixed_examples
    packed = collate_packed(examples, pad, pack_length)
    assert packed.shared_prefix == len(PREFIX)
    assert assert_same_loss_sum_and_gradients(model, collate(examples, pad, share_prefix=False), packed) > 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_behind_a_prefix_changing_one_example_changes_no_logit_of_another(models, prefixed_examples, impl):
    from tunelab.model.scoring import trained_logits

    model = models[impl]
    examples, pad = prefixed_examples
    base = collate_packed(examples, pad, 24)
    assert int(base.segment_ids.max()) > 1, "the test needs a row holding several examples"
    owner = torch.stack([torch.arange(base.segment_ids.shape[0])[:, None].expand_as(base.segment_ids),
                         base.segment_ids], dim=-1)[:, :-1]  # (R, T-1, 2): (row, segment) of each predicting position
    keep = base.labels[:, len(PREFIX) + 1 :] != IGNORE_INDEX
    owners = owner[:, len(PREFIX) :][keep]  # (N, 2) for the N trained logits, in trained_logits' order
    with torch.no_grad():
        before, _ = trained_logits(model, base)  # (N, vocab)
        for r in range(base.input_ids.shape[0]):
            for k in range(1, int(base.segment_ids[r].max()) + 1):
                changed = collate_packed(examples, pad, 24)
                cols = base.segment_ids[r] == k
                changed.input_ids[r, cols] = (changed.input_ids[r, cols] + 7) % model.config.vocab_size
                after, _ = trained_logits(model, changed)
                mine = (owners[:, 0] == r) & (owners[:, 1] == k)
                others = ~mine
                assert torch.equal(after[others], before[others])  # masked keys get exactly zero weight
                if mine.any():
                    assert not torch.equal(after[mine], before[mine])
