"""Evaluate a fine-tune against the base model, zero-shot and few-shot, on the SAME test rows.

    tunelab eval runs/banking77-20261122-101500            # the run's own held-out test split
    tunelab eval runs/banking77-... --data more_test.jsonl # any accepted data file

Produces the `eval.json` of docs/eval-format.md:

1. the task and its metric are chosen from the reference answers (and said why);
2. each contender (see contenders.py) generates an answer for every row; the answers
   are scored (metrics.score), with 95% bootstrap intervals, prompt tokens and latency;
   its loss and perplexity on the reference answers are measured with its own prompt;
3. the fine-tune is compared with each baseline on the same rows: McNemar's exact test
   for a right/wrong metric, the paired bootstrap otherwise, with wins and losses;
4. the forgetting check (forgetting.py) compares general ability with the base.

The base is the same weights with the adapter disabled (no second copy), except after
full fine-tuning, where the caller passes the base model loaded separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.data.batches import collate, shared_prefix_length
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import render_prompt, tokenize_conversations
from tunelab.evaluate.contenders import contender_prompts
from tunelab.evaluate.forgetting import run_forgetting_check
from tunelab.evaluate.generate import IN_PLACE_PREFIX, generate
from tunelab.evaluate.metrics import macro_f1_resampler, score, task_for_metric_setting
from tunelab.evaluate.stats import bootstrap_ci, bootstrap_ci_indices, mcnemar, paired_bootstrap
from tunelab.train.loop import Precision, reads_prefix_in_place, shared_prefix_kv, validation_metrics, validation_sums

ALPHA = 0.05  # significance level of the comparisons (and of the promotion gate)
EXAMPLES_KEPT = 10  # wins / losses quoted per comparison
MAX_LOSS_LENGTH = 4096  # tokens; longer prompt + answer rows are left out of the loss (counted)


def evaluate_run(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test_rows: list[Conversation],
    train_rows: list[Conversation],
    cfg: EvalConfig,
    precision: Precision,
    console: Console | None = None,
    base_model: PreTrainedModel | None = None,
    contenders: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Every contender on the same rows -> the eval.json object (without its summary)."""
    console = console or Console(stderr=True)
    rows = test_rows[: cfg.max_rows] if cfg.max_rows else list(test_rows)
    references = [r.answer for r in rows]
    # The task is a property of the data set, so it is judged on every known answer (train + test),
    # not on a sample of test rows that may hold each label once.
    task, metric, why = task_for_metric_setting(cfg.metric, [r.answer for r in train_rows + list(test_rows)])
    labels = sorted({r.answer for r in train_rows + list(test_rows)}) if task == "classification" else None
    prompts, shots = contender_prompts(rows, train_rows, labels, cfg.few_shot, cfg.seed)
    names = [n for n in prompts if (contenders is None or n in contenders) and (n == "finetune" or cfg.compare_base)]
    max_new = _max_new_tokens(tokenizer, references, labels, cfg)

    result: dict[str, Any] = {
        "format": "tunelab-eval/1", "task": task, "metric": metric, "metric_why": why, "test_rows": len(rows),
        "labels": len(labels) if labels else None, "few_shot": {"k": len(shots), "sources": [s.source for s in shots]},
        "generation": {"max_new_tokens": max_new, "temperature": cfg.temperature, "top_p": cfg.top_p,
                       "seed": cfg.seed, "stop": "end-of-turn" + (", newline" if task == "classification" else "")},
        "contenders": {},
    }
    was_training = model.training
    model.eval()
    for name in names:
        with _weights_of(name, model, base_model) as contender:
            result["contenders"][name] = _run_contender(
                name, contender, tokenizer, rows, prompts[name], references, task, labels, max_new, cfg, precision,
                console,
            )
    finetune = result["contenders"].get("finetune")
    result["comparisons"] = {
        name: compare(finetune, result["contenders"][name], rows, references, metric, seed=cfg.seed)
        for name in names if name != "finetune" and finetune is not None
    }
    if cfg.forgetting_probe and (cfg.compare_base and (isinstance(model, PeftModel) or base_model is not None)):
        result["forgetting"] = run_forgetting_check(
            model, tokenizer, precision, cfg.forgetting_threshold, batch_size=cfg.generation_batch, console=console,
            base_model=base_model,
        )
    model.train(was_training)
    return result


def _weights_of(name: str, model: PeftModel | PreTrainedModel, base_model: PreTrainedModel | None):
    """The fine-tune itself, or the base: a separate base model if given, else the adapter switched off."""
    if name == "finetune":
        return contextlib.nullcontext(model)
    if base_model is not None:
        return contextlib.nullcontext(base_model)
    if not isinstance(model, PeftModel):
        raise ValueError("a fully fine-tuned model needs base_model for the base contenders")

    @contextlib.contextmanager
    def adapter_off():
        with model.disable_adapter():
            yield model

    return adapter_off()


def _max_new_tokens(tokenizer: PreTrainedTokenizerBase, references: list[str], labels: list[str] | None,
                    cfg: EvalConfig) -> int:
    """The config's limit, else room for the longest answer (+2 tokens for a label, +50% for text)."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in (labels or references))
    return longest + 2 if labels else min(1024, math.ceil(longest * 1.5) + 16)


def _run_contender(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Conversation],
    prompt_messages: list[tuple[Message, ...]], references: list[str], task: str, labels: list[str] | None,
    max_new: int, cfg: EvalConfig, precision: Precision, console: Console,
) -> dict[str, Any]:
    prompts = [render_prompt(tokenizer, m) for m in prompt_messages]
    with Progress(TextColumn(f"[bold]eval {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task_id = progress.add_task(name, total=len(prompts))
        run = generate(
            model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.generation_batch, precision=precision,
            stop_token_ids=[tokenizer.eos_token_id],
            stop_strings=["\n"] if task == "classification" else None,  # a label is one line
            on_batch=lambda n: progress.advance(task_id, n),
            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
        )
    predictions = [g.text for g in run.generations]
    scored = score(task, predictions, references, labels)
    started = time.perf_counter()
    loss = reference_loss(model, tokenizer, rows, prompt_messages, precision, cfg.loss_batch)
    return {
        "metrics": {**scored.metrics, **loss},
        "ci": confidence_intervals(task, scored, predictions, references, labels, cfg.seed),
        "prompt_tokens_mean": sum(g.prompt_tokens for g in run.generations) / len(rows),
        "shared_prefix_tokens": run.shared_prefix_tokens,
        "seconds": run.seconds,
        "loss_seconds": time.perf_counter() - started,
        "ms_per_request": 1000 * run.seconds / len(rows),
        "never_stopped": sum(not g.stopped for g in run.generations),
        "sampling": dataclasses.asdict(run.sampling),
        "predictions": predictions,
        "correct": scored.correct,
        "scores": scored.scores,
        **({"confusion": scored.confusion} if scored.confusion else {}),
    }


def confidence_intervals(task: str, scored, predictions: list[str], references: list[str],
                         labels: list[str] | None, seed: int) -> dict[str, list[float]]:
    """95% percentile-bootstrap interval of each per-row metric (macro-F1 by resampling rows)."""
    ci = {}
    primary = {"classification": "accuracy", "structured": "json_exact", "free_text": "rouge_l"}[task]
    ci[primary] = list(bootstrap_ci(scored.scores, seed=seed))
    if task == "classification":
        ci["macro_f1"] = list(bootstrap_ci_indices(len(references), macro_f1_resampler(predictions, references, labels),
                                                   seed=seed))
    else:
        ci["normalized_match"] = list(bootstrap_ci([float(c) for c in scored.correct], seed=seed))
    return ci


@torch.no_grad()
def reference_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Conversation],
                   prompt_messages: list[tuple[Message, ...]], precision: Precision, batch_size: int) -> dict[str, Any]:
    """Loss per token of the reference answers (and end-of-turn) under this contender's prompt; perplexity."""
    convs = [Conversation((*m, Message("assistant", r.answer)), r.source) for m, r in zip(prompt_messages, rows)]
    examples, dropped = tokenize_conversations(tokenizer, convs, MAX_LOSS_LENGTH)
    if not examples:
        return {"loss": None, "perplexity": None}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # similar lengths together
    batches = [collate([examples[i] for i in order[s : s + batch_size]], tokenizer.pad_token_id)
               for s in range(0, len(order), batch_size)]
    # A long prefix every row shares (few-shot examples, a label list) is computed once for all batches and
    # read in place, as generation does (demo, 400 few-shot rows of ~673 tokens: 22 s -> 9 s).
    prefix = shared_prefix_length(examples) if len(examples) > 1 else 0
    prefix_kv = None
    if prefix >= IN_PLACE_PREFIX and reads_prefix_in_place(model):
        prefix_kv = shared_prefix_kv(model, examples[0].input_ids[:prefix], precision)
        batches = [dataclasses.replace(b, shared_prefix=prefix) for b in batches]
    loss = validation_metrics(validation_sums(model, batches, precision, prefix_kv))["val_loss"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_rows_dropped": len(dropped)}


def compare(finetune: dict[str, Any], baseline: dict[str, Any], rows: list[Conversation], references: list[str],
            metric: str, seed: int = 0) -> dict[str, Any]:
    """Fine-tune vs one baseline on the same rows: delta with its interval, a paired test, wins and losses."""
    a, b = np.asarray(finetune["scores"]), np.asarray(baseline["scores"])
    paired = paired_bootstrap(a, b, seed=seed)
    binary = set(np.unique(np.concatenate([a, b])).tolist()) <= {0.0, 1.0}
    if binary:  # right/wrong per row: McNemar's exact test on the rows where they disagree
        test = mcnemar(finetune["correct"], baseline["correct"])
        p_value, test_name = test.p_value, "mcnemar"
    else:
        p_value, test_name = paired.p_value, "paired_bootstrap"
    fine_right, base_right = np.asarray(finetune["correct"]), np.asarray(baseline["correct"])
    wins = np.flatnonzero(fine_right & ~base_right).tolist()
    losses = np.flatnonzero(~fine_right & base_right).tolist()

    def example(i: int) -> dict[str, str]:
        prompt = "\n".join(m.content for m in rows[i].prompt_messages if m.role == "user")
        return {"source": rows[i].source, "prompt": prompt, "reference": references[i],
                "finetune": finetune["predictions"][i], "baseline": baseline["predictions"][i]}

    delta = float(a.mean() - b.mean())
    return {
        "metric": metric, "finetune": float(a.mean()), "baseline": float(b.mean()), "delta": delta,
        "delta_ci": list(paired.delta_ci), "test": test_name, "p_value": p_value,
        "significant": bool(p_value < ALPHA and delta > 0),
        "wins": len(wins), "losses": len(losses),
        "win_examples": [example(i) for i in wins[:EXAMPLES_KEPT]],
        "loss_examples": [example(i) for i in losses[:EXAMPLES_KEPT]],
    }


def summary_of(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers the CLI prints and older readers use (accuracy, base accuracy, ...)."""
    metric = evaluation.get("metric")
    out: dict[str, Any] = {"task": evaluation.get("task"), "metric": metric, "test_rows": evaluation.get("test_rows")}
    for name, c in evaluation.get("contenders", {}).items():
        out[name] = {"value": c["metrics"].get(metric), "ci": c["ci"].get(metric),
                     "prompt_tokens": c["prompt_tokens_mean"], "ms_per_request": c["ms_per_request"],
                     "loss": c["metrics"].get("loss")}
    for name, comp in evaluation.get("comparisons", {}).items():
        out[f"vs_{name}"] = {"delta": comp["delta"], "p_value": comp["p_value"], "significant": comp["significant"]}
    if "forgetting" in evaluation:
        f = evaluation["forgetting"]
        out["forgetting"] = {"probe_delta": f["probe"]["delta"], "flagged": f["flagged"]}
    return out
