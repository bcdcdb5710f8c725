"""One whole run: train -> evaluate on the held-out rows -> eval.json, report, manifest with the summary.

    summary = run_pipeline(cfg)                               # tunelab train CONFIG, tunelab demo
    summary = evaluate_run_dir(run_dir)                       # tunelab eval RUN_DIR: its held-out rows again
    summary = evaluate_run_dir(run_dir, data=Path("more.jsonl"))   # another file: evals/<name>/ of its own

An evaluation on the run's own held-out rows is `eval.json`, the one the registry's gate reads.
An evaluation on another file never replaces it: it goes to `evals/<file stem>-<data sha256[:12]>/`
(eval.json, report.html, report.md), and the manifest lists every evaluation by name.
Under torchrun only rank 0 evaluates and writes; the other processes return None after training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.config import EvalConfig, RunConfig
from tunelab.data.read import Records
from tunelab.errors import TunelabError
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.report import write_report
from tunelab.evaluation.result import EvalResult
from tunelab.io import file_sha256
from tunelab.model.load import ResolvedModel, load_model, resolve_model, weights_fingerprint
from tunelab.model.precision import Precision, choose_precision
from tunelab.rundir import (
    HELD_OUT,
    ComparisonSummary,
    ContenderSummary,
    ForgettingSummary,
    RunDir,
    RunSummary,
    finished,
    load_run,
)
from tunelab.training import distributed
from tunelab.training.objectives import objective_for
from tunelab.training.recipe import TrainResult, train

log = logging.getLogger(__name__)
HELD_OUT_NAME = "held-out"  # the manifest's name for eval.json


def run_pipeline(cfg: RunConfig, resume: Path | None = None, records: Records | None = None) -> RunSummary | None:
    """Train (or resume), evaluate on the held-out rows, write eval.json, the report and the manifest."""
    started = time.perf_counter()
    result = train(cfg, resume=resume, records=records)
    distributed.shutdown(result.world)  # evaluation is rank 0's alone
    if not result.world.is_main:
        return None
    eval_started = time.perf_counter()
    evaluation = evaluate_trained(result)
    eval_seconds = time.perf_counter() - eval_started
    s = result.setup
    summary = summarize(evaluation, result.run, s.cfg, eval_seconds).model_copy(update={
        "precision": s.precision.reason,
        "train_rows": len(s.data.train),
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "trained_tokens_per_second": round(result.trained_tokens_per_second, 1),
        "validation_loss": result.final_validation_loss,
        "total_seconds": round(time.perf_counter() - started, 2),
        "timings": {k: round(v, 2) for k, v in {**result.timings, "evaluate": eval_seconds}.items()},
    })
    write_evaluation(result.run, HELD_OUT_NAME, evaluation, summary)
    return summary


def evaluate_trained(result: TrainResult) -> EvalResult:
    """The just-trained model on the run's held-out rows (the model is already in memory)."""
    s = result.setup
    test_rows, train_rows = s.data.held_out()
    base_model = _separate_base(s.cfg, s.cfg.eval, s.precision)
    evaluation = s.objective.evaluate(result.model, result.tokenizer, test_rows, train_rows, s.cfg.eval, s.precision,
                                      base_model=base_model, reuse=_reuse(s.cfg, s.cfg.eval, s.resolved, s.precision))
    return evaluation.model_copy(update={"data": f"{s.data.report.path} (the run's test split)"})


def evaluate_run_dir(run_dir: Path, data: Path | None = None, data_format: str | None = None,
                     overrides: dict[str, Any] | None = None) -> RunSummary:
    """`tunelab eval RUN_DIR [--data FILE]` (and `tunelab.evaluate`): evaluate a finished run again.

    Without `data` the run's own held-out rows are used (the split is a pure function of the data, so
    they are the rows held out at training time) and eval.json is rewritten. With `data`, every row of
    the file is a test row, read with the run's column mapping and system prompt, and the result goes
    to evals/NAME/, leaving eval.json (what the gate reads) as it was.
    """
    run = finished(run_dir)
    started = time.perf_counter()
    precision = choose_precision("auto")
    model, tokenizer, cfg = load_run(run.path, dtype=precision.weights_dtype)  # checks the chat-template canary
    eval_cfg = EvalConfig.model_validate({**cfg.eval.model_dump(), **(overrides or {})})
    objective = objective_for(cfg)
    if data is None:
        test_rows, train_rows = objective.held_out(cfg.data)
        name, source = HELD_OUT_NAME, f"{cfg.data.path} (the run's test split)"
    else:
        data = Path(data).resolve()
        data_cfg = cfg.data.model_copy(update={"path": data, "format": data_format or "auto"})
        test_rows, (_, train_rows) = objective.read(data_cfg), objective.held_out(cfg.data)
        name, source = f"{data.stem}-{file_sha256(data)[:12]}", str(data)
    if not test_rows:
        raise TunelabError(f"no test rows in {source}", fix="pass --data FILE with rows to evaluate", where=str(run.path))
    evaluation = objective.evaluate(model, tokenizer, test_rows, train_rows, eval_cfg, precision,
                                    base_model=_separate_base(cfg, eval_cfg, precision),
                                    reuse=_reuse(cfg, eval_cfg, resolve_model(cfg.model.name), precision))
    evaluation = evaluation.model_copy(update={"data": source})
    summary = summarize(evaluation, run, cfg, time.perf_counter() - started)
    previous = run.manifest().summary if data is None else None
    if previous is not None:  # the run's training figures stay in its summary; where it lives now is news
        summary = previous.model_copy(update={k: getattr(summary, k) for k in (*_EVAL_FIELDS, "run_dir")})
    write_evaluation(run, name, evaluation, summary if data is None else None)
    return summary


def _reuse(cfg: RunConfig, eval_cfg: EvalConfig, resolved: ResolvedModel, precision: Precision) -> BaseResults | None:
    """Where the base's results are read back and kept (evaluation/base_results.py), unless eval.reuse_base is off.
    The base is named by its weights, the kernels computing it, and, under an adapter, its quantization."""
    if not eval_cfg.reuse_base:
        return None
    quantized = cfg.lora.quantize_base if cfg.tuning != "full" else "none"  # full tuning evaluates the plain base
    return BaseResults(base=f"{weights_fingerprint(resolved)} kernels={cfg.model.kernels} quantize={quantized}",
                       precision=precision)


def _separate_base(cfg: RunConfig, eval_cfg: EvalConfig, precision: Precision) -> torch.nn.Module | None:
    """The base model loaded beside a fully tuned one (an adapter's base is the fine-tune with it switched off)."""
    if cfg.tuning != "full" or not eval_cfg.compare_base:
        return None
    base, _ = load_model(resolve_model(cfg.model.name), dtype=precision.weights_dtype, kernels=cfg.model.kernels)
    return base.eval()


def write_evaluation(run: RunDir, name: str, evaluation: EvalResult, summary: RunSummary | None) -> None:
    """eval.json and the report: the run's own for the held-out rows, else under evals/NAME/; then the manifest."""
    folder = run.path if name == HELD_OUT_NAME else run.path / "evals" / name
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.write(folder / HELD_OUT)
    write_report(run.path, evaluation=folder)
    run.write_manifest(summary, {name: str((folder / HELD_OUT).relative_to(run.path))})
    log.info("evaluation %s: %s", name, folder / HELD_OUT)


_EVAL_FIELDS = {"task", "metric", "test_rows", "contenders", "comparisons", "forgetting", "eval_seconds"}


def summarize(evaluation: EvalResult, run: RunDir, cfg: RunConfig, eval_seconds: float) -> RunSummary:
    """The figures the CLI prints: each contender's primary metric, the comparisons, forgetting."""
    contenders = {}
    for name, c in evaluation.contenders.items():
        value, ci = evaluation.primary(name)
        contenders[name] = ContenderSummary(value=value, ci=ci, prompt_tokens=c.prompt_tokens_mean,
                                            ms_per_request=c.ms_per_request, loss=c.metrics.get("loss"))
    comparisons = {name: ComparisonSummary(delta=c.delta, p_value=c.p_value, significant=c.significant)
                   for name, c in evaluation.comparisons.items()}
    forgetting = evaluation.forgetting
    return RunSummary(
        run_dir=str(run.path.resolve()), model=cfg.model.name, tuning=cfg.tuning, objective=cfg.objective,
        task=evaluation.task, metric=evaluation.metric, test_rows=evaluation.test_rows, contenders=contenders,
        comparisons=comparisons, eval_seconds=round(eval_seconds, 2),
        forgetting=ForgettingSummary(probe_delta=forgetting.probe.delta, flagged=forgetting.flagged) if forgetting else None,
    )
