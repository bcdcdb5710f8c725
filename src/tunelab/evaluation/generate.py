"""Batched generation with a KV cache, greedy or seeded sampling: used by evaluation (and later serving).

Why not `model.generate`: evaluation prompts share a long common prefix (system
prompt, label list, template header). We compute that prefix's KV cache once, the
way serving engines do prefix caching; `generate` would recompute it for every row.
A short prefix is then copied into every row of a batch (below); a long one
(IN_PLACE_PREFIX) stays one copy that every row's attention reads in place
(`attention.behind_shared_prefix`), and the rows' caches and masks start after it.
Everything else is the plain algorithm:

    one batch (prefix P shared, suffixes left-padded so all rows end together):

      kv/input   [ P P P P | pad pad s1 s1 s1 ]   attention_mask [1 1 1 1 | 0 0 1 1 1]
                 [ P P P P | s2  s2 s2 s2 s2  ]                  [1 1 1 1 | 1 1 1 1 1]
      positions  prefix 0..3, then each row's own tokens continue at 4, 5, ...

    then one token per step for every row, until each row has emitted a stop
    token (the end-of-turn) or `max_new_tokens` is reached. Rows are grouped by
    length so little work goes to padding; results come back in input order.
    The prompt pass runs on smaller runs of similar length than decoding does
    (`prefill`, evaluation/prefill.py): decoding gains from many rows per step, the prompt pass only
    pays for their padding.

Each step's token is the argmax (temperature 0, the default) or a draw from the
top-p nucleus of softmax(logits / temperature) (`sample_next`). A sampled answer
depends only on (seed, the prompt, its index in the caller's list): every prompt
has its own random generator, so batch size and batch neighbours change nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from tunelab.errors import TunelabError
from tunelab.evaluation.kv_cache import ReservedLayer
from tunelab.evaluation.prefill import prefill
from tunelab.evaluation.reference_scoring import Reference, score_references
from tunelab.model.kernels import attention
from tunelab.model.kernels.attention import generation_kernels
from tunelab.model.kernels.prefix import (
    IN_PLACE_PREFIX,
    MIN_GENERATION_PREFIX,
    common_prefix_length,
    reads_prefix_in_place,
)
from tunelab.model.load import body_and_head
from tunelab.model.precision import Precision

# batch_size=None ("auto"): rows per batch from a token budget. A decode step's fixed cost (30 layers of small
# ops) dominates at these sizes, so more rows per step is nearly free until the rows' tokens add up: on the
# demo prompts, tokens/s rose up to 128 rows and not beyond (2-core AMX VM; the sweep is in docs/benchmarks.md).
# What counts is what each row's KV cache holds: the whole prompt when a short shared prefix is copied into
# every row (the demo prompt: 128 rows), the part after the prefix when a long one is read in place
# (IN_PLACE_PREFIX; the 77-label prompt, ~36 of ~607 tokens: 128 rows, where with the prefix copied it was 39).
AUTO_TOKEN_BUDGET = 24_576  # rows x (longest cached prompt part in the batch + max_new_tokens)
AUTO_MAX_ROWS = 128
WHOLE_LAYERS = (ReservedLayer, DynamicLayer)  # cache layers that hold every token seen (no sliding window)


@dataclass(frozen=True)
class Generation:
    text: str  # decoded new tokens, stop token excluded
    token_ids: list[int]
    prompt_tokens: int  # full prompt length, shared prefix included
    stopped: bool  # True when a stop token ended it (False: hit max_new_tokens)
    reference_loss_sum: float | None = None  # summed loss of its Reference's trained tokens; None: none scored
    reference_tokens: int = 0  # trained tokens of its Reference


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen; checked on construction. Recorded in every GenerationRun."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: sample among the most probable tokens whose mass reaches top_p; 1: all
    seed: int = 0  # with the prompt's index, seeds that prompt's generator (unused when greedy)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # `not >=` also rejects NaN
            raise TunelabError(f"temperature {self.temperature} is negative",
                               fix="use 0 for greedy decoding, or a positive value such as 0.7 to sample")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"top_p {self.top_p} is outside (0, 1]",
                               fix="use 1.0 to sample from every token, or e.g. 0.9 to keep the most probable 90%")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRun:
    generations: list[Generation]
    seconds: float
    shared_prefix_tokens: int
    batches: int
    sampling: Sampling = Sampling()  # the settings it ran with, for eval.json: dataclasses.asdict(run.sampling)
    scoring_seconds: float = 0.0  # of the run, spent scoring references (not counted in `seconds`)


@torch.no_grad()
@generation_kernels()  # SDPA attention: faster decoding, see model/kernels/attention.py
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int | None,
    precision: Precision,
    stop_token_ids: list[int] | None = None,
    stop_strings: list[str] | None = None,
    share_prefix: bool = True,
    on_batch: Callable[[int], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    references: list[Reference | None] | None = None,
) -> GenerationRun:
    """Decode every prompt (lists of token ids); returns generations in input order.

    `batch_size`: rows per batch, or None to size each batch by tokens (see AUTO_TOKEN_BUDGET):
    prompts are grouped by length either way.
    Greedy by default; with `temperature` > 0 each token is drawn from the top-p nucleus
    (see `sample_next`), reproducibly: prompt i's answer depends on (seed, i) and the
    prompt, never on `batch_size` or the other prompts.
    Generation of a row ends at a stop token (default: eos, the end-of-turn; not part of
    the text) or once its text contains a stop string (the text is cut before it).
    `references` (one per prompt, or None for a row not to score): each Reference's loss under
    its prompt, in `Generation.reference_loss_sum`, from the prompt pass generation makes anyway.
    A model whose cache keeps only a window (sliding-window attention) scores nothing: every
    `reference_loss_sum` stays None and the caller scores another way.
    """
    sampling = Sampling(temperature, top_p, seed)  # raises on bad settings before any compute
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts: give one per prompt (None: skip)")
    if not prompts:
        return GenerationRun([], 0.0, 0, 0, sampling)
    stop = set(stop_token_ids if stop_token_ids is not None else [tokenizer.eos_token_id])
    ending = ids_containing(tokenizer, stop_strings or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()

    # Every row must keep at least one token of its own to start decoding from.
    prefix_len = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    prefix_len = min(prefix_len, min(len(p) for p in prompts) - 1)
    body, head = body_and_head(model)
    prefix_cache = None
    if prefix_len >= MIN_GENERATION_PREFIX:
        prefix_cache = DynamicCache(config=model.config)
        with precision.autocast():
            body(input_ids=torch.tensor([prompts[0][:prefix_len]]), cache=prefix_cache, use_cache=True)
    else:
        prefix_len = 0
    # A long prefix (few-shot examples, a label list) is read in place by every row with our attention on CPU
    # (attention.behind_shared_prefix), and the rows' caches hold only their own tokens. A short one (a system
    # prompt) is copied into every row, where one SDPA call per layer is faster than two. (2-core AMX VM, 300
    # Banking77 prompts, 571-token prefix: copied 197, in place 361 tokens/s; the 13-token case is in
    # docs/benchmarks.md.)
    in_place = prefix_len >= IN_PLACE_PREFIX and reads_prefix_in_place(model)
    prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers] if in_place else None
    cached_prefix = 0 if in_place else prefix_len  # prefix columns in each row's cache and mask

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    batches = 0
    held = [len(p) - prefix_len + cached_prefix for p in prompts]  # tokens each row's cache holds before decoding
    scoring_seconds = 0.0
    for idx in length_batches(order, held, max_new_tokens, batch_size):
        # Keyed on the caller's index i, not the batch row: the same prompt gets the same draws in any batch.
        gens = None if sampling.greedy else [_prompt_generator(seed, i, model.device) for i in idx]
        refs = [references[i] for i in idx] if references is not None else None
        with attention.behind_shared_prefix(prefix_kv) if prefix_kv else contextlib.nullcontext():
            batch = _generate_batch(
                body, head, model.config, [prompts[i][prefix_len:] for i in idx], prefix_len, cached_prefix,
                None if in_place else prefix_cache, max_new_tokens, stop, ending, pad_id, precision, sampling, gens,
                refs,
            )
        scoring_seconds += batch.scoring_seconds
        for row, (i, (ids, stopped)) in enumerate(zip(idx, batch.outputs)):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            for s in stop_strings or []:
                text = text.split(s, 1)[0]
            loss, tokens = batch.scores[row] if batch.scores is not None else (None, 0)
            results[i] = Generation(text, ids, len(prompts[i]), stopped, loss, tokens)
        batches += 1
        if on_batch:
            on_batch(len(idx))
    seconds = time.perf_counter() - started - scoring_seconds
    return GenerationRun([r for r in results if r is not None], seconds, prefix_len, batches, sampling, scoring_seconds)


def length_batches(order: list[int], lengths: list[int], max_new_tokens: int, batch_size: int | None) -> list[list[int]]:
    """Consecutive runs of `order` (indices sorted by length): `batch_size` rows each, or by the token budget.

    With batch_size None a batch takes rows while rows x (its longest row + max_new_tokens) stays
    within AUTO_TOKEN_BUDGET and rows <= AUTO_MAX_ROWS (always at least one row). E.g. lengths
    33 and new tokens 16: 24,576 // 49 = 501 -> 128 rows; lengths 607: 24,576 // 623 = 39 rows.
    """
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending length, so the newest row is the batch's longest
        if current and (len(current) + 1 > AUTO_MAX_ROWS
                        or (len(current) + 1) * (lengths[i] + max_new_tokens) > AUTO_TOKEN_BUDGET):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """The next token of each row of `logits` (B, vocab) -> (B,): argmax at temperature 0, else one draw.

    The draw: softmax(logits / temperature) in fp32, then the nucleus: the smallest set of most
    probable tokens whose mass reaches `top_p` (never empty), renormalised. Example: probabilities
    [0.4, 0.3, 0.2, 0.1] with top_p 0.5 keep tokens 0 and 1 (0.4 < 0.5 <= 0.7), drawn 4:3.
    Row i draws with `generators[i]` alone.
    """
    if temperature == 0:
        # max(...).indices, not argmax: the same first index of the largest value, and faster on CPU, where
        # argmax has no vectorised bf16 path (2.4 ms instead of 15.7 ms for (128, 49,152) bf16 logits on the
        # 2-core AMX VM).
        return logits.max(dim=-1).indices
    assert generators is not None and len(generators) == logits.shape[0], "one generator per row"
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V); fp32 even under a bf16 autocast
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V) each
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V): mass of the more probable tokens
        # A token is in the nucleus while the mass before it is short of top_p; the first (0 < top_p) always is.
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # A loop of one-row draws, not one batched torch.multinomial: a batched call takes its random numbers
    # from one generator for all rows, so a row's token would depend on its batch neighbours and position.
    # Batches hold tens of rows (eval default 32) and a (V,) draw costs far less than the forward pass,
    # so the Python loop is cheap next to the step it belongs to.
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _prompt_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A generator seeded from a hash of (seed, index): (0, 1) and (1, 0) must not collide as seed + index would."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


def _generate_batch(
    body: torch.nn.Module,
    head: torch.nn.Module,
    config: PretrainedConfig,
    suffixes: list[list[int]],  # sorted by length, shortest first (`prefill_chunks` groups neighbours)
    prefix_len: int,
    cached_prefix: int,  # see prefill
    prefix_cache: DynamicCache | None,
    max_new_tokens: int,
    stop_ids: set[int],
    ending_ids: set[int],
    pad_id: int,
    precision: Precision,
    sampling: Sampling,
    generators: list[torch.Generator] | None,  # one per row of `suffixes` when sampling, else None
    references: list[Reference | None] | None,  # one per row of `suffixes` to score, else None
) -> BatchOutput:
    b = len(suffixes)
    cache, logits, mask = prefill(body, head, config, suffixes, prefix_len, cached_prefix, prefix_cache, pad_id,
                                   precision, reserve=max_new_tokens)
    positions = torch.tensor([[prefix_len + len(s) - 1] for s in suffixes])  # (B, 1): each row's last prompt token
    scores, scoring_seconds = None, 0.0
    if references is not None and any(references) and all(type(layer) in WHOLE_LAYERS for layer in cache.layers):
        scoring_started = time.perf_counter()
        scores = score_references(body, head, cache, logits, mask, positions, references, pad_id, precision)
        scoring_seconds = time.perf_counter() - scoring_started

    new_tokens: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    active = torch.arange(b)  # which original rows are still generating, in cache order
    stop_tensor = torch.tensor(sorted(stop_ids))
    ends_tensor = torch.tensor(sorted(ending_ids))
    for step in range(max_new_tokens):
        rows = active.tolist()
        # Generators follow their rows through `active`, so dropping finished rows keeps each row's own.
        row_generators = None if generators is None else [generators[row] for row in rows]
        next_ids = sample_next(logits, sampling.temperature, sampling.top_p, row_generators)  # (A,)
        is_stop = torch.isin(next_ids, stop_tensor)  # end-of-turn: not part of the answer
        is_end = torch.isin(next_ids, ends_tensor) & ~is_stop  # holds a stop string: kept, text cut later
        for j, row in enumerate(rows):
            if not is_stop[j]:
                new_tokens[row].append(int(next_ids[j]))
            stopped[row] = bool(is_stop[j] or is_end[j])
        keep = (~(is_stop | is_end)).nonzero().squeeze(1)  # (A',)
        if keep.numel() == 0 or step == max_new_tokens - 1:
            break
        if keep.numel() < active.numel():  # finished rows leave the batch: no compute spent on them
            cache.batch_select_indices(keep)
            active, next_ids, mask, positions = active[keep], next_ids[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.long)], dim=1)
        positions = positions + 1
        with precision.autocast():  # the next step's logits: one token per active row
            hidden = body(
                input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            ).last_hidden_state  # (A, 1, H), A = active rows
            logits = head(hidden[:, -1].contiguous())  # (A, vocab)
    return BatchOutput(list(zip(new_tokens, stopped)), scores, scoring_seconds)


@dataclass(frozen=True)
class BatchOutput:
    outputs: list[tuple[list[int], bool]]  # per row: new token ids, stopped by a stop token
    scores: list[tuple[float | None, int]] | None  # per row: (summed reference loss, its tokens); None: not scored
    scoring_seconds: float


def ids_containing(tokenizer: PreTrainedTokenizerBase, strings: list[str]) -> set[int]:
    """Every token id whose text contains one of `strings` (e.g. a newline ends a one-line answer)."""
    return set(_ids_containing(tokenizer, tuple(strings))) if strings else set()


@functools.lru_cache(maxsize=8)
def _ids_containing(tokenizer: PreTrainedTokenizerBase, strings: tuple[str, ...]) -> frozenset[int]:
    # Decoding the whole vocabulary takes a moment: once per tokenizer, not once per `generate` call.
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if any(s in text for s in strings))
