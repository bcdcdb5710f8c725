"""tunelab.evaluation.generate, sampling: the top-p sampler itself, and seeded sampling in `generate`.

What a seeded evaluation promises: a prompt's sampled answer depends on (seed, its index,
the prompt) only; the batch size, its batch neighbours and dropped (finished) rows change nothing.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.errors import TunelabError
from tunelab.evaluation.generate import Sampling, generate, sample_next
from tunelab.model.precision import choose_precision

FP32 = choose_precision("fp32")
USERS = [  # ten prompts of different lengths: batch sizes 1, 3 and 8 group them differently
    "where is my card",
    "the quick brown fox jumps over the lazy dog and what is two plus two",
    "yes",
    "good morning, my phone is lost and I need help with it",
    "refund",
    "what is the exchange rate today",
    "top up my card please",
    "no",
    "thank you, good night",
    "is the refund ok or is there a problem with the card again",
]
HOT = {"temperature": 1.5}  # flat enough on a random tiny model that samples differ from greedy


def prompts(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, [Message("system", "Classify the intent."), Message("user", u)]) for u in USERS]


def run_ids(model, tokenizer, ps, *, batch_size: int = 4, max_new_tokens: int = 10, **kw) -> list[tuple[list[int], bool]]:
    run = generate(model, tokenizer, ps, max_new_tokens=max_new_tokens, batch_size=batch_size, precision=FP32, **kw)
    return [(g.token_ids, g.stopped) for g in run.generations]


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# --- the sampler on fixed logits ------------------------------------------------------------------

def draw_counts(probs: list[float], temperature: float, top_p: float, rows: int = 8, steps: int = 500) -> torch.Tensor:
    """Token counts over rows x steps draws (4,000 by default), each row with its own generator."""
    logits = torch.tensor(probs).log().expand(rows, -1)  # (B, V)
    gens = generators(0, rows)
    draws = torch.stack([sample_next(logits, temperature, top_p, gens) for _ in range(steps)])  # (steps, B)
    return torch.bincount(draws.flatten(), minlength=len(probs))


def assert_binomial(count: int, n: int, p: float) -> None:
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) < 4 * sd, f"{count} draws of {n}, expected {n * p:.0f} +- 4 x {sd:.1f}"


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, 0.0, 1.0, None), logits.argmax(dim=-1))
    assert torch.equal(sample_next(logits, 0.0, 0.1, None), logits.argmax(dim=-1))  # top_p has no say when greedy


def test_top_p_keeps_the_nucleus_in_ratio():
    # [0.4, 0.3, 0.2, 0.1] with top_p 0.5: 0.4 falls short of 0.5, 0.4 + 0.3 reaches it -> tokens 0 and 1, 4:3.
    counts = draw_counts([0.4, 0.3, 0.2, 0.1], temperature=1.0, top_p=0.5)
    n = int(counts.sum())
    assert n == 4000
    assert counts[2] == 0 and counts[3] == 0
    assert_binomial(int(counts[0]), n, 4 / 7)


def test_temperature_reshapes_and_top_p_one_keeps_every_token():
    probs = [0.4, 0.3, 0.2, 0.1]
    counts = draw_counts(probs, temperature=2.0, top_p=1.0)  # softmax(log p / 2) is proportional to sqrt(p)
    flat = [math.sqrt(p) / sum(math.sqrt(q) for q in probs) for p in probs]
    for c, p in zip(counts.tolist(), flat):
        assert_binomial(c, 4000, p)


def test_top_p_keeps_at_least_the_top_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 5.0, -1.0]])  # row 1: a tie, the first index wins as in argmax
    assert sample_next(logits, 1.0, 1e-9, generators(0, 2)).tolist() == [1, 0]


def test_a_row_draws_with_its_own_generator_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    gens, alone_gen = generators(10, 3), generators(10, 3)[1]  # row 1's generator, and a fresh copy of it
    together = [int(sample_next(logits, 1.0, 0.9, gens)[1]) for _ in range(20)]
    alone = [int(sample_next(logits[1:2], 1.0, 0.9, [alone_gen])[0]) for _ in range(20)]
    assert together == alone


@pytest.mark.parametrize(
    ("kw", "named"),
    [({"temperature": -0.1}, "temperature -0.1"), ({"temperature": math.nan}, "temperature nan"),
     ({"top_p": 0.0}, "top_p 0.0"), ({"top_p": 1.5}, "top_p 1.5"), ({"top_p": math.nan}, "top_p nan")],
)
def test_bad_settings_are_clear_errors(kw, named):
    with pytest.raises(TunelabError, match=named) as err:  # raised before any work, even with no prompts
        generate(None, None, [], max_new_tokens=4, batch_size=2, precision=FP32, **kw)
    assert err.value.fix


# --- generate ---------------------------------------------------------------------------------------

def test_defaults_are_greedy_and_recorded(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    run = generate(model, tokenizer, ps, max_new_tokens=10, batch_size=4, precision=FP32)
    assert run.sampling == Sampling(temperature=0.0, top_p=1.0, seed=0) and run.sampling.greedy
    default = [(g.token_ids, g.stopped) for g in run.generations]
    assert default == run_ids(model, tokenizer, ps, temperature=0.0)
    assert default == run_ids(model, tokenizer, ps, temperature=0.0, top_p=0.3, seed=7)  # greedy ignores both

    hot = generate(model, tokenizer, ps, max_new_tokens=2, batch_size=4, precision=FP32, temperature=0.7, top_p=0.9, seed=3)
    assert dataclasses.asdict(hot.sampling) == {"temperature": 0.7, "top_p": 0.9, "seed": 3}  # what eval.json records


def test_greedy_matches_hf_generate(tiny_loaded):
    model, tokenizer = tiny_loaded
    p = prompts(tokenizer)[1]
    with torch.no_grad():
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    hf = out[0, len(p):].tolist()
    expected = (hf[:-1], True) if hf and hf[-1] == tokenizer.eos_token_id else (hf, False)  # ours drops the eos
    assert run_ids(model, tokenizer, [p]) == [expected]


def test_tiny_top_p_is_greedy(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    assert run_ids(model, tokenizer, ps, top_p=1e-6, seed=5, **HOT) == run_ids(model, tokenizer, ps)


def test_same_seed_same_samples_other_seed_other_samples(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    first = run_ids(model, tokenizer, ps, seed=0, **HOT)
    assert run_ids(model, tokenizer, ps, seed=0, **HOT) == first
    assert run_ids(model, tokenizer, ps, seed=1, **HOT) != first
    assert first != run_ids(model, tokenizer, ps)  # it does sample: not the greedy answers


def test_batch_size_and_neighbours_do_not_change_samples(tiny_loaded):
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    one = run_ids(model, tokenizer, ps, batch_size=1, top_p=0.9, seed=11, **HOT)
    assert run_ids(model, tokenizer, ps, batch_size=8, top_p=0.9, seed=11, **HOT) == one
    assert run_ids(model, tokenizer, ps, batch_size=3, top_p=0.9, seed=11, **HOT) == one
    assert run_ids(model, tokenizer, ps, batch_size=3, top_p=0.9, seed=11, share_prefix=False, **HOT) == one
    # Fewer neighbours (so different length groups): prompts keep their index, hence their samples.
    assert run_ids(model, tokenizer, ps[:4], batch_size=2, top_p=0.9, seed=11, **HOT) == one[:4]


def test_finished_rows_leave_the_batch_with_their_generators(tiny_loaded):
    """A stop token ends some rows early; the rows that go on keep drawing from their own generators."""
    model, tokenizer = tiny_loaded
    ps = prompts(tokenizer)
    free = [ids for ids, _ in run_ids(model, tokenizer, ps, batch_size=1, seed=4, stop_token_ids=[], **HOT)]

    def first_hit(t: int) -> int:  # the earliest step at which a row emits t, for a t that not every row emits
        rows = [ids.index(t) for ids in free if t in ids]
        return min(rows) if 0 < len(rows) < len(free) else len(free[0])

    stop = min({t for ids in free for t in ids}, key=first_hit)
    expected = [(ids[: ids.index(stop)], True) if stop in ids else (ids, False) for ids in free]
    assert any(stopped and len(ids) < 8 for ids, stopped in expected)  # dropped while others go on
    assert any(not stopped for _, stopped in expected)
    for batch_size in (8, 3, 10):
        assert run_ids(model, tokenizer, ps, batch_size=batch_size, seed=4, stop_token_ids=[stop], **HOT) == expected
