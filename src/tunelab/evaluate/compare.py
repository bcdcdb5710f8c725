"""Fine-tune vs base model on the SAME held-out rows (classification tasks).

Contenders:
  - finetune:      the adapter, with the short prompt it was trained on;
  - base_prompted: the same weights with the adapter disabled (no second copy in
                   memory), prompted with the full list of labels so it can answer
                   at all. Its long prompt is the price of not fine-tuning, so
                   prompt tokens per request are reported beside accuracy.
Both are scored by the same normalized exact match.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

from peft import PeftModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedTokenizerBase

from tunelab.config import EvalConfig
from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import render_prompt
from tunelab.evaluate.generate import generate
from tunelab.evaluate.metrics import accuracy
from tunelab.train.loop import Precision

BASE_INSTRUCTION = "Answer with exactly one label from this list and nothing else.\nLabels: {labels}"


def base_prompt_messages(conv: Conversation, labels: list[str]) -> tuple[Message, ...]:
    """The base model's prompt: the row's own system prompt (if any) plus the full label list."""
    own = [m for m in conv.prompt_messages if m.role == "system"]
    instruction = BASE_INSTRUCTION.format(labels=", ".join(labels))
    system = f"{own[0].content}\n{instruction}" if own else instruction
    return (Message("system", system), *[m for m in conv.prompt_messages if m.role != "system"])


def evaluate_classification(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    test_rows: list[Conversation],
    labels: list[str],
    cfg: EvalConfig,
    precision: Precision,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    rows = test_rows[: cfg.max_rows] if cfg.max_rows else test_rows
    references = [r.answer for r in rows]
    longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    max_new = cfg.max_new_tokens or longest + 2
    contenders: dict[str, tuple[list[list[int]], contextlib.AbstractContextManager]] = {
        "finetune": ([render_prompt(tokenizer, r.prompt_messages) for r in rows], contextlib.nullcontext()),
    }
    if cfg.compare_base:
        contenders["base_prompted"] = (
            [render_prompt(tokenizer, base_prompt_messages(r, labels)) for r in rows],
            model.disable_adapter(),
        )

    results: dict[str, Any] = {"task": "classification", "test_rows": len(rows), "labels": len(labels)}
    model.eval()
    for name, (prompts, adapter_state) in contenders.items():
        with Progress(
            TextColumn(f"[bold]eval {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(name, total=len(prompts))
            with adapter_state:
                run = generate(
                    model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.batch_size,
                    precision=precision, stop_token_ids=[tokenizer.eos_token_id],
                    # A label is one line: both contenders stop at a newline (and are scored on the first line).
                    stop_strings=["\n"],
                    on_batch=lambda n: progress.advance(task, n),
                )
        predictions = [g.text for g in run.generations]
        label_set = {lbl.lower() for lbl in labels}
        results[name] = {
            **accuracy(predictions, references),
            "prompt_tokens_mean": sum(g.prompt_tokens for g in run.generations) / len(rows),
            "shared_prefix_tokens": run.shared_prefix_tokens,
            "seconds": run.seconds,
            "ms_per_request": 1000 * run.seconds / len(rows),
            "not_a_label": sum(p.strip().lower() not in label_set for p in predictions) / len(rows),
            "never_stopped": sum(not g.stopped for g in run.generations),
            "most_common_predictions": Counter(predictions).most_common(5),
            "examples": [
                {"source": r.source, "reference": ref, "prediction": p}
                for r, ref, p in list(zip(rows, references, predictions))[:10]
            ],
        }
    return results
