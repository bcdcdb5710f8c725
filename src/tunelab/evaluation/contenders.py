"""Evaluate a fine-tune against the base model, zero-shot and few-shot, on the SAME test rows.

    result = evaluate_run(model, tokenizer, test_rows, train_rows, cfg.eval, precision)   # -> EvalResult

The three contenders:

    finetune        the row's own prompt (what the fine-tune was trained on), adapter on
    base_zero_shot  the same prompt, adapter off: the base model as the dataset asks it
    base_few_shot   adapter off; k examples drawn once from train (seeded) as earlier
                    user/assistant turns, and for classification the label list in the
                    system prompt, so plain prompting gets its best fair chance

1. the task and its metric are chosen from the reference answers (and said why);
2. each contender generates an answer for every row; the answers are scored (metrics.score),
   with 95% bootstrap intervals, prompt tokens and latency; its loss and perplexity on the
   reference answers under its own prompt are read off generation's prompt pass (the answer's
   tokens run on the prompt's KV cache: a prompt is computed once for both);
3. the fine-tune is compared with each baseline on the same rows (compare.py);
4. the forgetting check (forgetting.py) compares general ability with the base.

The k examples are the same for every row, so every few-shot prompt shares a long prefix that
generation and the loss compute once. A row's prompt tokens are reported beside its score: the
price of prompting instead of fine-tuning. The base is the same weights with the adapter disabled
(no second copy), except after full fine-tuning, where the caller passes the base model loaded
separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import sys
import time

import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.data.batches import collate, shared_prefix_length
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_conversations
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.compare import RowText, compare, confidence_intervals
from tunelab.evaluation.forgetting import run_forgetting_check
from tunelab.evaluation.generate import GenerationRun, generate
from tunelab.evaluation.metrics import score, task_for_metric_setting
from tunelab.evaluation.reference_scoring import Reference
from tunelab.evaluation.result import Confusion, Contender, EvalResult, FewShot, Generation, Sampling
from tunelab.model.kernels.prefix import IN_PLACE_PREFIX, reads_prefix_in_place, shared_prefix_kv
from tunelab.model.load import body_and_head
from tunelab.model.precision import Precision
from tunelab.model.scoring import validation_metrics, validation_sums
from tunelab.progress import bar

log = logging.getLogger(__name__)

LABELS_INSTRUCTION = "Answer with exactly one label from this list and nothing else.\nLabels: {labels}"
CONTENDERS = ("finetune", "base_zero_shot", "base_few_shot")
# The eval settings a contender's answers and scores depend on (beyond its prompts): part of a reused result's key.
GENERATION_SETTINGS = {"temperature", "top_p", "seed", "batch_size", "max_new_tokens", "metric"}
MAX_LOSS_LENGTH = 4096  # tokens; longer prompt + answer rows are left out of the loss (counted)


def label_instruction(labels: list[str]) -> str:
    return LABELS_INSTRUCTION.format(labels=", ".join(labels))


def draw_shots(train_rows: list[Conversation], k: int, seed: int, exclude: set[str] = frozenset()) -> list[Conversation]:
    """k single-answer training rows, drawn reproducibly (never a row whose prompt is in `exclude`)."""
    usable = [r for r in train_rows if r.prompt_messages and r.messages[-1].role == "assistant"
              and _user_text(r) not in exclude]
    return random.Random(seed).sample(usable, min(k, len(usable)))


def few_shot_messages(conv: Conversation, shots: list[Conversation], labels: list[str] | None) -> tuple[Message, ...]:
    """System (own + label list) -> shot 1 user/assistant -> ... -> the row's own turns.

    Example, k=1, labels [card_arrival, lost_card]:
        system:    "Classify the intent.\\nAnswer with exactly one label ...\\nLabels: card_arrival, lost_card"
        user:      "When will my card come?"      assistant: "card_arrival"
        user:      "I lost my card"               (the test row; the model answers next)
    """
    own = [m for m in conv.prompt_messages if m.role == "system"]
    parts = [own[0].content] if own else []
    if labels:
        parts.append(label_instruction(labels))
    system = (Message("system", "\n".join(parts)),) if parts else ()
    turns: list[Message] = []
    for shot in shots:
        turns.extend(m for m in shot.prompt_messages if m.role != "system")
        turns.append(Message("assistant", shot.answer, weight=0))  # context: never scored by the loss
    return (*system, *turns, *[m for m in conv.prompt_messages if m.role != "system"])


def contender_prompts(
    rows: list[Conversation], train_rows: list[Conversation], labels: list[str] | None, k: int, seed: int
) -> tuple[dict[str, list[tuple[Message, ...]]], list[Conversation]]:
    """Prompt messages per contender (same rows, same order), and the shots the few-shot contender saw."""
    prompts = {
        "finetune": [r.prompt_messages for r in rows],
        "base_zero_shot": [r.prompt_messages for r in rows],
    }
    shots: list[Conversation] = []
    if k > 0:
        shots = draw_shots(train_rows, k, seed, exclude={_user_text(r) for r in rows})
        prompts["base_few_shot"] = [few_shot_messages(r, shots, labels) for r in rows]
    return prompts, shots


def _user_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.prompt_messages if m.role == "user")


def evaluate_run(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test_rows: list[Conversation],
    train_rows: list[Conversation],
    cfg: EvalConfig,
    precision: Precision,
    base_model: PreTrainedModel | None = None,
    contenders: tuple[str, ...] | None = None,
    forgetting_items: list | None = None,
    reuse: BaseResults | None = None,
) -> EvalResult:
    """Every contender on the same rows, compared, and the forgetting check: eval.json's object.

    `contenders` limits which run (all by default); `forgetting_items` replaces the shipped probe (tests);
    `reuse`: where the base's results from an earlier evaluation are read back and kept (base_results.py).
    """
    rows = test_rows[: cfg.max_rows] if cfg.max_rows else list(test_rows)
    references = [r.answer for r in rows]
    # The task is a property of the data set, so it is judged on every known answer (train + test),
    # not on a sample of test rows that may hold each label once.
    task, metric, why = task_for_metric_setting(cfg.metric, [r.answer for r in train_rows + list(test_rows)])
    labels = sorted({r.answer for r in train_rows + list(test_rows)}) if task == "classification" else None
    prompts, shots = contender_prompts(rows, train_rows, labels, cfg.few_shot, cfg.seed)
    names = [n for n in prompts if (contenders is None or n in contenders) and (n == "finetune" or cfg.compare_base)]
    max_new = _max_new_tokens(tokenizer, references, labels, cfg)

    was_training = model.training
    model.eval()
    ran: dict[str, Contender] = {}
    for name in names:
        ids = [render_prompt(tokenizer, m) for m in prompts[name]]
        key = None
        if reuse is not None and name != "finetune":
            # What the base answers depends on the prompts (ids: template and tokenizer included), the references
            # (loss, scores), the labels and the settings; the fine-tune is never part of it.
            key = reuse.key("contender", tokenizer, name=name, separate_base=base_model is not None, prompts=ids,
                            references=references, task=task, labels=labels, max_new=max_new,
                            settings=cfg.model_dump(include=GENERATION_SETTINGS))
            stored = _stored_contender(reuse.get(key))
            if stored is not None:
                ran[name] = stored
                log.info("eval %s: read back from an earlier evaluation (%s)", name, reuse.root)
                continue
        with _weights_of(name, model, base_model) as contender:
            ran[name] = _run_contender(name, contender, tokenizer, rows, prompts[name], ids, references, task, labels,
                                       max_new, cfg, precision)
        if key is not None:
            reuse.put(key, ran[name].model_dump(mode="json"))
    texts = [RowText(r.source, _user_text(r), ref) for r, ref in zip(rows, references)]
    finetune = ran.get("finetune")
    comparisons = {name: compare(finetune, ran[name], texts, metric, seed=cfg.seed)
                   for name in names if name != "finetune" and finetune is not None}
    forgetting = None
    if cfg.forgetting_probe and (cfg.compare_base and (isinstance(model, PeftModel) or base_model is not None)):
        forgetting = run_forgetting_check(model, tokenizer, precision, cfg.forgetting_threshold,
                                          batch_size=cfg.generation_batch, base_model=base_model, items=forgetting_items,
                                          reuse=reuse)
    model.train(was_training)
    return EvalResult(
        task=task, metric=metric, metric_why=why, test_rows=len(rows), labels=len(labels) if labels else None,
        few_shot=FewShot(k=len(shots), sources=[s.source for s in shots]),
        generation=Generation(max_new_tokens=max_new, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              stop="end-of-turn" + (", newline" if task == "classification" else "")),
        contenders=ran, comparisons=comparisons, forgetting=forgetting,
    )


def _stored_contender(stored: dict | None) -> Contender | None:
    """A stored base contender, marked reused; None for none, or for one that is not a Contender (an edited file)."""
    if stored is None:
        return None
    try:
        return Contender.model_validate({**stored, "reused": True})
    except ValidationError as e:
        log.warning("a stored base contender does not read as one (%s): computing it again", e.errors()[0]["msg"])
        return None


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
    prompt_messages: list[tuple[Message, ...]], prompts: list[list[int]], references: list[str], task: str,
    labels: list[str] | None, max_new: int, cfg: EvalConfig, precision: Precision,
) -> Contender:
    answers = reference_answers(tokenizer, rows, prompt_messages, prompts)
    with bar(f"eval {name}", len(prompts)) as (progress, task_id):
        run = generate(
            model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.generation_batch, precision=precision,
            stop_token_ids=[tokenizer.eos_token_id],
            stop_strings=["\n"] if task == "classification" else None,  # a label is one line
            on_batch=lambda n: progress.advance(task_id, n),
            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, references=answers,
        )
    predictions = [g.text for g in run.generations]
    scored = score(task, predictions, references, labels)
    loss, loss_seconds = shared_pass_loss(run, answers), run.scoring_seconds
    if loss is None:  # the answers could not ride along with generation: a pass of their own
        started = time.perf_counter()
        loss = reference_loss(model, tokenizer, rows, prompt_messages, precision, cfg.loss_batch)
        loss_seconds = time.perf_counter() - started
    return Contender(
        metrics={**scored.metrics, **loss},
        ci=confidence_intervals(task, scored, predictions, references, labels, cfg.seed),
        prompt_tokens_mean=sum(g.prompt_tokens for g in run.generations) / len(rows),
        shared_prefix_tokens=run.shared_prefix_tokens,
        seconds=run.seconds,
        loss_seconds=loss_seconds,
        ms_per_request=1000 * run.seconds / len(rows),
        never_stopped=sum(not g.stopped for g in run.generations),
        sampling=Sampling(**dataclasses.asdict(run.sampling)),
        predictions=predictions,
        correct=scored.correct,
        scores=scored.scores,
        confusion=Confusion(**scored.confusion) if scored.confusion else None,
    )


def reference_answers(tokenizer: PreTrainedTokenizerBase, rows: list[Conversation],
                      prompt_messages: list[tuple[Message, ...]], prompts: list[list[int]]) -> list[Reference | None] | None:
    """Each row's reference answer as the tokens that follow its prompt, for generation to score on the way.

    The tokens are the training tokenization of (prompt, answer) after the prompt: the answer and the
    end-of-turn, exactly what `reference_loss` scores. A row longer than MAX_LOSS_LENGTH is None (left out,
    counted). None for all when some row's tokens do not start with its prompt's own (a template that
    renders a prompt differently once an answer follows): then `reference_loss` runs a pass of its own.
    """
    convs = [Conversation((*m, Message("assistant", r.answer)), r.source) for m, r in zip(prompt_messages, rows)]
    examples, _ = tokenize_conversations(tokenizer, convs, max_length=sys.maxsize)
    answers: list[Reference | None] = []
    for prompt, example in zip(prompts, examples, strict=True):
        n = len(prompt)
        if (example.input_ids[:n] != prompt or len(example.input_ids) <= n
                or any(label != IGNORE_INDEX for label in example.labels[:n])):
            return None
        if len(example.input_ids) > MAX_LOSS_LENGTH:
            answers.append(None)
            continue
        answers.append(Reference(tuple(example.input_ids[n:]), tuple(x != IGNORE_INDEX for x in example.labels[n:])))
    return answers


def shared_pass_loss(run: GenerationRun, answers: list[Reference | None] | None) -> dict[str, float | None] | None:
    """`reference_loss`'s figures from the losses generation read off its prompt pass; None if it read none."""
    if answers is None:
        return None
    scored = [(g.reference_loss_sum, g.reference_tokens) for g, a in zip(run.generations, answers) if a is not None]
    if any(loss is None for loss, _ in scored):
        return None
    tokens = sum(n for _, n in scored)
    if not tokens:
        return {"loss": None, "perplexity": None}
    loss = sum(x for x, _ in scored) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_rows_dropped": answers.count(None)}


@torch.no_grad()
def reference_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Conversation],
                   prompt_messages: list[tuple[Message, ...]], precision: Precision,
                   batch_size: int) -> dict[str, float | None]:
    """Loss per token of the reference answers (and end-of-turn) under this contender's prompt; perplexity."""
    convs = [Conversation((*m, Message("assistant", r.answer)), r.source) for m, r in zip(prompt_messages, rows)]
    examples, dropped = tokenize_conversations(tokenizer, convs, MAX_LOSS_LENGTH)
    if not examples:
        return {"loss": None, "perplexity": None}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # similar lengths together
    batches = [collate([examples[i] for i in order[s : s + batch_size]], tokenizer.pad_token_id)
               for s in range(0, len(order), batch_size)]
    # A long prefix every row shares (few-shot examples, a label list) is computed once for all batches and
    # read in place, as generation does (the demo's few-shot loss took ~2.4x less time).
    prefix = shared_prefix_length(examples) if len(examples) > 1 else 0
    prefix_kv = None
    if prefix >= IN_PLACE_PREFIX and reads_prefix_in_place(model):
        prefix_kv = shared_prefix_kv(body_and_head(model)[0], examples[0].input_ids[:prefix], precision)
        batches = [dataclasses.replace(b, shared_prefix=prefix) for b in batches]
    loss = validation_metrics(validation_sums(model, batches, precision, prefix_kv))["val_loss"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_rows_dropped": len(dropped)}
