"""tunelab.evaluation.generate: batched greedy decoding with a shared-prefix KV cache."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.evaluation.generate import generate
from tunelab.evaluation.reference_scoring import Reference
from tunelab.model.kernels.prefix import MIN_GENERATION_PREFIX, common_prefix_length
from tunelab.model.precision import choose_precision

FP32 = choose_precision("fp32")
USERS = [
    "where is my card",
    "the quick brown fox jumps over the lazy dog and what is two plus two",
    "yes",
    "good morning, my phone is lost and I need help with it",
    "refund",
]


def prompts(tokenizer, system: str = "Classify the intent.") -> list[list[int]]:
    return [render_prompt(tokenizer, [Message("system", system), Message("user", u)]) for u in USERS]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], bool]:
    """The plain algorithm: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stop:
            return out, True
        out.append(nxt)
        ids.append(nxt)
    return out, False


@pytest.fixture(scope="module", params=["base", "finetune"])
def model_and_tokenizer(request, tiny_loaded, trained_run):
    if request.param == "base":
        return tiny_loaded
    return trained_run.result.model, trained_run.result.tokenizer


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    assert common_prefix_length([[7, 1], [8, 1]]) == 0


def test_batched_shared_prefix_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    assert len({len(p) for p in ps}) == len(ps)  # different lengths: left padding is exercised
    run = generate(model, tokenizer, ps, max_new_tokens=8, batch_size=len(ps), precision=FP32)
    assert run.shared_prefix_tokens >= MIN_GENERATION_PREFIX
    assert run.shared_prefix_tokens == common_prefix_length(ps)
    assert run.batches == 1
    assert len(run.generations) == len(ps)
    for p, g in zip(ps, run.generations):
        alone = generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, precision=FP32, share_prefix=False)
        (a,) = alone.generations
        assert alone.shared_prefix_tokens == 0
        assert g.token_ids == a.token_ids
        assert g.stopped == a.stopped
        assert g.prompt_tokens == len(p)
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_matches_uncached_reference_and_keeps_input_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    order = [3, 0, 4, 1, 2]  # not sorted by length
    shuffled = [ps[i] for i in order]
    run = generate(model, tokenizer, shuffled, max_new_tokens=6, batch_size=2, precision=FP32)
    assert run.batches == 3
    stop = {tokenizer.eos_token_id}
    for p, g in zip(shuffled, run.generations):
        ids, stopped = reference_greedy(model, p, 6, stop)
        assert (g.token_ids, g.stopped) == (ids, stopped)
        assert g.prompt_tokens == len(p)


def test_stop_token_ends_generation(tiny_loaded):
    model, tokenizer = tiny_loaded
    p = prompts(tokenizer)[0]
    free = generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1, precision=FP32, stop_token_ids=[])
    (g,) = free.generations
    assert len(g.token_ids) == 5 and not g.stopped
    first, second = g.token_ids[0], g.token_ids[1]

    (g,) = generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1, precision=FP32,
                    stop_token_ids=[first]).generations
    assert g.stopped and g.token_ids == [] and g.text == ""

    if second != first:
        (g,) = generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1, precision=FP32,
                        stop_token_ids=[second]).generations
        assert g.stopped and g.token_ids == [first]


def test_stop_in_one_row_does_not_end_the_others(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    free = generate(model, tokenizer, ps, max_new_tokens=4, batch_size=len(ps), precision=FP32, stop_token_ids=[])
    first_tokens = [g.token_ids[0] for g in free.generations]
    stop_on = first_tokens[0]
    run = generate(model, tokenizer, ps, max_new_tokens=4, batch_size=len(ps), precision=FP32, stop_token_ids=[stop_on])
    for g_free, g in zip(free.generations, run.generations):
        if stop_on in g_free.token_ids:
            cut = g_free.token_ids.index(stop_on)
            assert g.stopped and g.token_ids == g_free.token_ids[:cut]
        else:
            assert not g.stopped and g.token_ids == g_free.token_ids


@pytest.mark.parametrize("max_new_tokens", [1, 3, 9])
def test_max_new_tokens_respected(tiny_loaded, max_new_tokens):
    model, tokenizer = tiny_loaded
    run = generate(model, tokenizer, prompts(tokenizer), max_new_tokens=max_new_tokens, batch_size=2,
                   precision=FP32, stop_token_ids=[])
    assert [len(g.token_ids) for g in run.generations] == [max_new_tokens] * len(USERS)
    assert not any(g.stopped for g in run.generations)


def test_no_prompts():
    run = generate(None, None, [], max_new_tokens=4, batch_size=2, precision=FP32)
    assert run.generations == [] and run.batches == 0


def test_stop_string_cuts_text_and_ends_the_row(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    free = generate(model, tokenizer, ps, max_new_tokens=6, batch_size=len(ps), precision=FP32, stop_token_ids=[])
    # Pick an ASCII letter that some row generates, and use it as the stop string. (Random weights also
    # produce partial UTF-8 bytes, which decode to U+FFFD alone and differently in context.)
    stop = next(ch for g in free.generations for ch in g.text if ch.isascii() and ch.isalpha())
    run = generate(model, tokenizer, ps, max_new_tokens=6, batch_size=len(ps), precision=FP32, stop_token_ids=[],
                   stop_strings=[stop])
    hit = 0
    for g_free, g in zip(free.generations, run.generations):
        assert stop not in g.text
        assert g_free.text.startswith(g.text)
        if stop in g_free.text:
            hit += 1
            assert g.stopped and g.text == g_free.text.split(stop, 1)[0]
        else:
            assert g.token_ids == g_free.token_ids
    assert hit >= 1


def test_auto_batches_are_sized_by_tokens_and_keep_every_row_once():
    from tunelab.evaluation.generate import AUTO_MAX_ROWS, AUTO_TOKEN_BUDGET, length_batches

    lengths = [33] * 300 + [607] * 100
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = length_batches(order, lengths, 16, None)
    assert [i for b in batches for i in b] == order  # every row once, in length order
    assert all(len(b) * (max(lengths[i] for i in b) + 16) <= AUTO_TOKEN_BUDGET for b in batches)
    short = [b for b in batches if max(lengths[i] for i in b) == 33]
    assert max(len(b) for b in short) == AUTO_MAX_ROWS  # short prompts: as many rows as allowed
    long = [b for b in batches if min(lengths[i] for i in b) == 607]
    assert max(len(b) for b in long) == AUTO_TOKEN_BUDGET // (607 + 16)
    # A single prompt over the budget still gets a batch of its own.
    assert length_batches([0], [AUTO_TOKEN_BUDGET * 2], 16, None) == [[0]]
    assert length_batches(list(range(5)), [1] * 5, 16, 2) == [[0, 1], [2, 3], [4]]


def test_generations_do_not_depend_on_the_batching(model_and_tokenizer):
    from tunelab.evaluation.generate import generate
    from tunelab.model.precision import choose_precision

    model, tokenizer = model_and_tokenizer
    prompts = [[5, 6, 7] + [8] * n for n in range(1, 12)]
    precision = choose_precision("fp32")
    fixed = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3, precision=precision, stop_token_ids=[])
    auto = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=None, precision=precision, stop_token_ids=[])
    assert [g.token_ids for g in auto.generations] == [g.token_ids for g in fixed.generations]
    assert auto.batches == 1 and fixed.batches == 4


def test_prefill_chunks_bound_the_padding():
    from tunelab.evaluation.prefill import prefill_chunks

    assert prefill_chunks([10, 10, 12, 40], 8) == [range(0, 3), range(3, 4)]  # with 40: 4 x 40 - 72 = 88 pads
    assert prefill_chunks([10, 10, 12, 40], 1000) == [range(0, 4)]
    assert prefill_chunks([5, 6, 7], 0) == [range(0, 1), range(1, 2), range(2, 3)]
    assert prefill_chunks([5, 5, 5], 0) == [range(0, 3)]  # equal lengths: no padding, one chunk
    assert prefill_chunks([], 8) == []
    lengths = sorted([13, 10, 88, 17, 17, 26, 40, 12] * 16)
    for max_padding in (0, 16, 128):
        chunks = prefill_chunks(lengths, max_padding)
        assert [i for c in chunks for i in c] == list(range(len(lengths)))  # every row once, in order
        for c in chunks:
            part = lengths[c.start : c.stop]
            assert len(part) == 1 or len(part) * max(part) - sum(part) <= max_padding


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prompt_pass_in_chunks_generates_the_same(model_and_tokenizer, monkeypatch, temperature):
    """Chunks of one row each (max padding 0) and one chunk for the batch give the same tokens as the plain path."""
    import tunelab.evaluation.prefill as pre

    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer)
    suffix_lengths = sorted(len(p) - common_prefix_length(ps) for p in ps)
    assert len(pre.prefill_chunks(suffix_lengths, 0)) == len(ps)  # every row its own prompt pass
    runs = {}
    for max_padding in (0, 10_000):
        monkeypatch.setattr(pre, "PREFILL_MAX_PADDING", max_padding)
        runs[max_padding] = generate(model, tokenizer, ps, max_new_tokens=6, batch_size=len(ps), precision=FP32,
                                     temperature=temperature, seed=3)
    assert [g.token_ids for g in runs[0].generations] == [g.token_ids for g in runs[10_000].generations]
    assert [g.stopped for g in runs[0].generations] == [g.stopped for g in runs[10_000].generations]
    if temperature == 0:
        for p, g in zip(ps, runs[0].generations):
            assert (g.token_ids, g.stopped) == reference_greedy(model, p, 6, {tokenizer.eos_token_id})


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prefix_read_in_place_generates_the_same(model_and_tokenizer, monkeypatch, temperature):
    """A long shared prefix is read in place, not copied into every row: same tokens as the copy and the plain path."""
    import tunelab.evaluation.generate as gen
    from tunelab.model.kernels import attention

    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer, system="Classify the intent of the message into one of the labels. " * 3)
    calls = []
    real = attention._attention_behind_prefix
    monkeypatch.setattr(attention, "_attention_behind_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for threshold in (10_000, 1):  # copied into every row, then read in place
        monkeypatch.setattr(gen, "IN_PLACE_PREFIX", threshold)
        runs[threshold] = generate(model, tokenizer, ps, max_new_tokens=6, batch_size=None, precision=FP32,
                                   temperature=temperature, seed=5)
        assert bool(calls) == (threshold == 1)  # the in-place attention ran only when asked for
    assert runs[1].shared_prefix_tokens == common_prefix_length(ps) > 30
    assert [g.token_ids for g in runs[1].generations] == [g.token_ids for g in runs[10_000].generations]
    assert [g.stopped for g in runs[1].generations] == [g.stopped for g in runs[10_000].generations]
    if temperature == 0:
        for p, g in zip(ps, runs[1].generations):
            assert (g.token_ids, g.stopped) == reference_greedy(model, p, 6, {tokenizer.eos_token_id})


@torch.no_grad()
def plain_reference_loss(model, prompt: list[int], reference: Reference) -> float:
    """The reference's summed loss from one uncached forward over prompt + reference."""
    ids = prompt + list(reference.ids)
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, vocab)
    n = len(prompt)
    return sum(float(torch.nn.functional.cross_entropy(logits[n + t - 1], torch.tensor(token)))
               for t, (token, trained) in enumerate(zip(reference.ids, reference.trained)) if trained)


@pytest.mark.parametrize("in_place", [False, True])
def test_references_are_scored_on_the_prompt_pass_and_leave_generation_unchanged(model_and_tokenizer, monkeypatch,
                                                                                  in_place):
    """Each reference's loss equals a plain forward over prompt + reference; the generated tokens are those
    of a run without references (scoring reads a copy of the prompts' cache)."""
    import tunelab.evaluation.generate as gen
    import tunelab.evaluation.prefill as pre

    model, tokenizer = model_and_tokenizer
    ps = prompts(tokenizer, system="Classify the intent of the message into one of the labels. " * 3)
    monkeypatch.setattr(gen, "IN_PLACE_PREFIX", 1 if in_place else 10_000)
    monkeypatch.setattr(pre, "PREFILL_MAX_PADDING", 0)  # a prompt-pass chunk per row: the cache laid out from parts
    eot = tokenizer.eos_token_id
    references = [
        Reference((11, 12, 13, eot), (True, True, True, True)),
        Reference((21,), (True,)),  # one token: read off the prompt pass alone
        None,  # not scored
        Reference((31, 32, 33, 34, 35, 36, 37, 38, 39, eot), (True,) * 10),  # longer than the decode reserve
        Reference((41, 42, eot, 43), (True, False, True, False)),  # untrained tokens are fed, not scored
    ]
    plain = generate(model, tokenizer, ps, max_new_tokens=4, batch_size=None, precision=FP32)
    scored = generate(model, tokenizer, ps, max_new_tokens=4, batch_size=None, precision=FP32, references=references)
    assert [g.token_ids for g in scored.generations] == [g.token_ids for g in plain.generations]
    assert [g.stopped for g in scored.generations] == [g.stopped for g in plain.generations]
    assert scored.scoring_seconds > 0
    for p, ref, g in zip(ps, references, scored.generations):
        if ref is None:
            assert (g.reference_loss_sum, g.reference_tokens) == (None, 0)
        else:
            assert g.reference_tokens == sum(ref.trained)
            assert g.reference_loss_sum == pytest.approx(plain_reference_loss(model, p, ref), rel=1e-4)


def test_references_need_one_per_prompt(tiny_loaded):
    model, tokenizer = tiny_loaded
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, tokenizer, prompts(tokenizer), max_new_tokens=2, batch_size=None, precision=FP32,
                 references=[None])


def test_scoring_references_leaves_the_prompt_cache_as_it_was(tiny_loaded):
    """Decoding continues on the cache scoring read: it must hold the prompts again, and only them."""
    from tunelab.evaluation.prefill import prefill
    from tunelab.evaluation.reference_scoring import score_references
    from tunelab.model.load import body_and_head

    model, tokenizer = tiny_loaded
    suffixes = prompts(tokenizer)[:3]
    body, head = body_and_head(model)
    with torch.no_grad():
        cache, logits, mask = prefill(body, head, model.config, suffixes, 0, 0, None, tokenizer.pad_token_id,
                                          FP32, reserve=2)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        positions = torch.tensor([[len(s) - 1] for s in suffixes])
        refs = [Reference((5, 6, 7, 8, 9), (True,) * 5), Reference((5,), (True,)), None]
        score_references(body, head, cache, logits, mask, positions, refs, tokenizer.pad_token_id, FP32)
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(cache.layers, before, strict=True))
