"""One whole run: train -> evaluate (fine-tune vs base zero-shot and few-shot) -> eval.json -> report -> manifest.

Used by `tunelab train CONFIG` and `tunelab demo`; returns the summary they print.
Under torchrun only rank 0 evaluates and writes; the other processes return after training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.evaluate.evaluation import evaluate_run, summary_of
from tunelab.evaluate.report import write_report
from tunelab.model.load import load_model
from tunelab.train import distributed
from tunelab.rundir import MANIFEST
from tunelab.train.recipe import TrainResult, train


def run_pipeline(cfg: RunConfig, console: Console | None = None, resume: Path | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    result = train(cfg, console, resume=resume)
    if not result.world.is_main:
        distributed.shutdown(result.world)
        return {}
    distributed.shutdown(result.world)  # evaluation is rank 0's alone

    eval_started = time.perf_counter()
    evaluation = evaluate(result, cfg, console)
    eval_seconds = time.perf_counter() - eval_started
    summary = {
        **legacy_summary(evaluation),
        "run_dir": str(result.run.path.resolve()),
        "train_rows": len(result.data.train),
        "train_seconds": round(result.train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "timings": {k: round(v, 2) for k, v in {**result.timings, "evaluate": eval_seconds}.items()},
        "tokens_per_second": round(result.tokens_per_second, 1),
        "trained_tokens_per_second": round(result.trained_tokens_per_second, 1),
        "validation_loss": result.final_validation_loss,
        "precision": result.precision.reason,
        "model": cfg.model,
        "tuning": cfg.tuning,
        "objective": cfg.objective,
    }
    result.run.write_json("eval.json", {**evaluation, "summary": summary})
    write_report(result.run.path)
    result.run.write_manifest({"summary": summary})
    return summary


def evaluate_saved_run(run_dir: Path, data: Path | None = None, data_format: str | None = None,
                       overrides: dict[str, Any] | None = None, console: Console | None = None) -> dict[str, Any]:
    """`tunelab eval RUN_DIR [--data FILE]`: evaluate a finished run again, rewrite eval.json, the report, the manifest.

    Without --data the run's own test split is used (the split is a pure function of the
    data file, so it is the same rows as at training time); with --data every row of FILE
    is a test row, read with the run's column mapping and system prompt.
    """
    from tunelab.config import EvalConfig
    from tunelab.data.records import read_conversations
    from tunelab.data.split import split_conversations
    from tunelab.model.load import resolve_model
    from tunelab.rundir import RunDir, load_run
    from tunelab.train.loop import choose_precision

    console = console or Console(stderr=True)
    started = time.perf_counter()
    precision = choose_precision("auto")
    model, tokenizer, cfg = load_run(run_dir, dtype=precision.weights_dtype)  # checks the chat-template canary
    eval_cfg = EvalConfig.model_validate({**cfg.eval.model_dump(), **(overrides or {})})
    split = split_conversations(read_conversations(cfg.data), cfg.data.split)
    if data is None:
        rows, source = split.test, f"{cfg.data.path} (the run's test split)"
    else:
        data_cfg = cfg.data.model_copy(update={"path": Path(data).resolve(), "format": data_format or "auto"})
        rows, source = read_conversations(data_cfg), str(Path(data).resolve())
    if not rows:
        raise TunelabError(f"no test rows in {source}", fix="pass --data FILE with rows to evaluate",
                           where=str(run_dir))
    base_model = None
    if (run_dir / "model").is_dir() and eval_cfg.compare_base:
        base_model, _ = load_model(resolve_model(cfg.model), dtype=precision.weights_dtype)
        base_model.eval()
    evaluation = evaluate_run(model, tokenizer, rows, split.train, eval_cfg, precision, console, base_model=base_model)
    evaluation["data"] = source
    run = RunDir(run_dir)
    previous = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")).get("summary", {}) \
        if (run_dir / "eval.json").is_file() else {}
    summary = {**previous, **legacy_summary(evaluation), "run_dir": str(run_dir.resolve()),
               "eval_seconds": round(time.perf_counter() - started, 2)}
    run.write_json("eval.json", {**evaluation, "summary": summary})
    write_report(run_dir)
    manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    run.write_manifest({k: v for k, v in manifest.items() if k not in ("format", "files")} | {"summary": summary})
    return summary


def evaluate(result: TrainResult, cfg: RunConfig, console: Console) -> dict[str, Any]:
    """The eval.json object of the run's own test split (preference runs: their validation rewards)."""
    if cfg.objective == "dpo":
        # Pairs have no single reference answer to score generations against; the rewards say how DPO went.
        return {"format": "tunelab-eval/1", "task": "preference", "metric": "reward_accuracy",
                "test_rows": len(result.data.test_rows), "contenders": {}, "comparisons": {}}
    split = result.data.split
    if not split.test:
        return {"format": "tunelab-eval/1", "task": None, "test_rows": 0, "contenders": {}, "comparisons": {}}
    base_model = None
    if cfg.tuning == "full" and cfg.eval.compare_base:  # no adapter to switch off: load the base beside it
        base_model, _ = load_model(result.resolved, dtype=result.precision.weights_dtype)
        base_model.eval()
    return evaluate_run(result.model, result.tokenizer, split.test, split.train, cfg.eval, result.precision, console,
                        base_model=base_model)


def legacy_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Flat keys the CLI table, `--json` readers and the demo test use: fine-tune vs the best baseline."""
    flat = summary_of(evaluation)
    finetune = flat.get("finetune", {})
    baselines = [flat[n] for n in ("base_few_shot", "base_zero_shot") if n in flat]
    best = max(baselines, key=lambda c: c["value"] or 0.0) if baselines else {}
    if flat.get("metric") != "accuracy":  # the accuracy keys mean accuracy; other metrics live under their names
        finetune, best = {}, {}
    return {
        **flat,
        "accuracy": finetune.get("value"), "accuracy_ci": finetune.get("ci"),
        "base_accuracy": best.get("value"), "base_accuracy_ci": best.get("ci"),
        "prompt_tokens": finetune.get("prompt_tokens"), "base_prompt_tokens": best.get("prompt_tokens"),
        "ms_per_request": finetune.get("ms_per_request"), "base_ms_per_request": best.get("ms_per_request"),
    }
