"""Held-out evaluation of a preference (DPO) run: does the fine-tune prefer the chosen answers more often
than the base does?

    result = evaluate_preferences(model, tokenizer, test_pairs, cfg.eval, precision)   # -> EvalResult

For each held-out pair, each contender scores both completions (the sum of log p over the answer's
tokens and its end-of-turn, under the pair's prompt): it "prefers" the chosen answer when that sum
is higher. The metric is the fraction of pairs preferred correctly, for the fine-tune (adapter on)
and the base (adapter off), on the same pairs; McNemar's exact test compares them, as for a
classification run, so the registry's promotion gate applies unchanged. Pairs have no single
reference answer to generate against, so nothing is generated; the forgetting check runs as for
supervised runs.
"""

from __future__ import annotations

import contextlib
import time

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.data.pairs import collate_pairs, tokenize_pairs
from tunelab.data.records import PreferencePair
from tunelab.evaluation.compare import RowText, compare
from tunelab.evaluation.forgetting import run_forgetting_check
from tunelab.evaluation.result import Contender, EvalResult
from tunelab.evaluation.stats import bootstrap_ci
from tunelab.model.precision import Precision
from tunelab.model.scoring import sequence_logprobs

METRIC = "preference_accuracy"
WHY = "preference pairs: how often a model gives the chosen answer a higher log-probability than the rejected one"
MAX_PAIR_LENGTH = 4096  # tokens per row; longer pairs are left out (counted in test_rows)


def evaluate_preferences(model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair],
                         cfg: EvalConfig, precision: Precision, forgetting_items: list | None = None) -> EvalResult:
    """The fine-tune and the base (its adapter off) on the same held-out pairs, compared; eval.json's object."""
    rows = pairs[: cfg.max_rows] if cfg.max_rows else list(pairs)
    tokenized, _ = tokenize_pairs(tokenizer, rows, MAX_PAIR_LENGTH)
    if not tokenized:
        return EvalResult(task="preference", metric=METRIC, metric_why=WHY, test_rows=0)
    kept = {p.source for p in tokenized}
    texts = [RowText(p.source, "\n".join(m.content for m in p.prompt if m.role == "user"),
                     "\n".join(m.content for m in p.chosen if m.role == "assistant")) for p in rows if p.source in kept]
    batches = [collate_pairs(tokenized[i : i + cfg.loss_batch], tokenizer.pad_token_id)
               for i in range(0, len(tokenized), cfg.loss_batch)]
    prompt_tokens = sum(len(p.chosen.input_ids) - p.chosen.trained_tokens for p in tokenized) / len(tokenized)
    was_training = model.training
    model.eval()
    contenders = {"finetune": _contender(model, batches, precision, contextlib.nullcontext(), prompt_tokens, cfg.seed)}
    if cfg.compare_base:
        contenders["base_zero_shot"] = _contender(model, batches, precision, model.disable_adapter(), prompt_tokens,
                                                  cfg.seed)
    comparisons = {name: compare(contenders["finetune"], c, texts, METRIC, seed=cfg.seed)
                   for name, c in contenders.items() if name != "finetune"}
    forgetting = None
    if cfg.forgetting_probe and cfg.compare_base:
        forgetting = run_forgetting_check(model, tokenizer, precision, cfg.forgetting_threshold,
                                          batch_size=cfg.generation_batch, items=forgetting_items)
    model.train(was_training)
    return EvalResult(task="preference", metric=METRIC, metric_why=WHY, test_rows=len(tokenized),
                      contenders=contenders, comparisons=comparisons, forgetting=forgetting)


@torch.no_grad()
def _contender(model: PeftModel, batches: list, precision: Precision, weights: contextlib.AbstractContextManager,
               prompt_tokens: float, seed: int) -> Contender:
    """Score both completions of every pair under `weights` (adapter on, or off)."""
    started = time.perf_counter()
    margins: list[float] = []
    with weights:
        for pair_batch in batches:
            with precision.autocast():
                logp = sequence_logprobs(model, pair_batch.batch)  # (2B,): chosen rows first
            b = pair_batch.pairs
            margins += (logp[:b] - logp[b:]).tolist()  # log p(chosen) - log p(rejected), per pair
    seconds = time.perf_counter() - started
    correct = [m > 0 for m in margins]
    scores = [float(c) for c in correct]
    n = len(margins)
    return Contender(
        metrics={METRIC: sum(scores) / n, "margin_mean": sum(margins) / n},
        ci={METRIC: tuple(bootstrap_ci(scores, seed=seed))},
        prompt_tokens_mean=prompt_tokens, seconds=seconds, ms_per_request=1000 * seconds / n,
        predictions=["chosen" if c else "rejected" for c in correct], correct=correct, scores=scores,
    )
