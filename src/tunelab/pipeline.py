"""One whole run: train -> evaluate against the base -> write eval.json -> manifest last.

Used by `tunelab train CONFIG` and `tunelab demo`; returns the summary they print.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config import RunConfig
from tunelab.evaluate.compare import evaluate_classification
from tunelab.train.sft import train


def run_pipeline(cfg: RunConfig, console: Console | None = None, resume: Path | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    result = train(cfg, console, resume=resume)

    eval_started = time.perf_counter()
    split = result.data.split
    if split.stratified and split.test:
        labels = sorted({c.answer for c in split.train + split.validation + split.test})
        evaluation = evaluate_classification(
            result.model, result.tokenizer, split.test, labels, cfg.eval, result.precision, console
        )
    else:
        # Free-text metrics (ROUGE-L, JSON validity, ...) belong to `tunelab eval`; a run still records its loss.
        evaluation = {"task": "generation", "test_rows": len(split.test)}
    eval_seconds = time.perf_counter() - eval_started

    finetune = evaluation.get("finetune", {})
    base = evaluation.get("base_prompted", {})
    summary: dict[str, Any] = {
        "run_dir": str(result.run.path.resolve()),
        "task": evaluation["task"],
        "accuracy": finetune.get("accuracy"),
        "accuracy_ci": finetune.get("accuracy_ci"),
        "base_accuracy": base.get("accuracy"),
        "base_accuracy_ci": base.get("accuracy_ci"),
        "test_rows": evaluation["test_rows"],
        "train_rows": len(result.data.train),
        "train_seconds": round(result.train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "trained_tokens_per_second": round(result.trained_tokens_per_second, 1),
        "validation_loss": result.final_validation_loss,
        "prompt_tokens": finetune.get("prompt_tokens_mean"),
        "base_prompt_tokens": base.get("prompt_tokens_mean"),
        "ms_per_request": finetune.get("ms_per_request"),
        "base_ms_per_request": base.get("ms_per_request"),
        "precision": result.precision.reason,
        "model": cfg.model,
    }
    result.run.write_json("eval.json", {"summary": summary, **evaluation})
    result.run.write_manifest({"summary": summary})
    return summary
