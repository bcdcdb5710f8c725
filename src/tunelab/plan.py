"""`tunelab plan CONFIG` (= `tunelab train CONFIG --dry-run`): what a run will cost, before it runs.

The estimate comes from measuring this machine, not from constants:

1. the run's own setup (model load, data read, split, tokenize, the compiled kernels'
   probe) is timed for real;
2. a probe runs `probe_steps` real optimizer steps (after one untimed warm-up step) on
   the run's own first micro-batches, and gives seconds per real input token; the
   run's total real tokens (known after tokenizing) times that is the training time;
3. one validation pass is timed (after one untimed batch, which compiles the kernels'
   graph without gradients, as the run's first validation does) and multiplied by the
   number of validations;
4. evaluation is probed on one generation batch of test prompts per contender (128
   rows with `eval.batch_size: auto`) and scaled to the rows the run will evaluate.

Nothing is written: no run directory, no adapter. The probe's optimizer steps change
only the in-memory copy that is thrown away afterwards.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any

from rich.console import Console

from tunelab.model.kernels.compiled import restore_eager
from tunelab.config import RunConfig
from tunelab.evaluate.evaluation import evaluate_run
from tunelab.evaluate.generate import AUTO_MAX_ROWS
from tunelab.train.setup import setup
from tunelab.train.recipe import backward_on, validate

DEFAULT_PRICE_PER_HOUR = 0.10  # USD; about a 2-vCPU cloud VM. Pass your own with --price-per-hour.


def make_plan(
    cfg: RunConfig, console: Console, probe_steps: int = 3, price_per_hour: float = DEFAULT_PRICE_PER_HOUR
) -> dict[str, Any]:
    started = time.perf_counter()
    s = setup(cfg, console)
    cfg, t = s.cfg, s.cfg.train  # 'auto' values resolved
    setup_seconds = time.perf_counter() - started

    # Training: seconds per real token over a few real steps of this run.
    groups = [s.stream[i * t.grad_accumulation : (i + 1) * t.grad_accumulation] for i in range(s.steps)]
    probe = groups[: probe_steps + 1]
    probe_seconds, probe_tokens = 0.0, 0
    s.model.train()
    for i, group in enumerate(probe):
        step_started = time.perf_counter()
        batches = [s.collate(mb) for mb in group]
        backward_on(s.loss_module, batches, s.precision)  # the run's loss: SFT or DPO
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        if i > 0 or len(probe) == 1:  # the first step warms caches and allocators: not timed
            probe_seconds += time.perf_counter() - step_started
            probe_tokens += sum(b.real_tokens for b in batches)
    seconds_per_token = probe_seconds / max(probe_tokens, 1)
    total_tokens = s.tokens_to_train
    trained_tokens = sum(e.trained_tokens for mb in s.stream for e in mb)
    train_seconds = total_tokens * seconds_per_token

    # Validation: one timed pass, times the number of passes the run makes.
    validations = (s.steps - 1) // t.eval_every + 1 if t.eval_every else 1
    if s.val_batches:  # untimed: the compiled kernels' graph without gradients compiles once, on the first pass
        validate(dataclasses.replace(s, val_batches=s.val_batches[:1]))
    val_started = time.perf_counter()
    if s.val_batches:
        validate(s)  # the run's own validation (SFT: loss and token accuracy; DPO: loss and rewards)
    validation_seconds = (time.perf_counter() - val_started) * validations if s.val_batches else 0.0

    # Evaluation: one batch per contender (generation + reference loss), scaled to the rows evaluated;
    # the forgetting probe is a fixed cost, timed whole.
    eval_seconds, eval_rows = 0.0, 0
    split = getattr(s.data, "split", None)
    restore_eager(s.model)  # as training leaves the model for evaluation
    if split is not None and split.test and cfg.tuning == "lora":
        eval_rows = min(cfg.eval.max_rows or len(split.test), len(split.test))
        # One whole generation batch: per-row cost falls with rows per batch (a decode step's fixed cost is
        # shared), so a smaller sample than the run's own batches would overstate the evaluation time.
        sample = min(cfg.eval.generation_batch or AUTO_MAX_ROWS, eval_rows)
        probe_cfg = cfg.eval.model_copy(update={"max_rows": sample})
        probe_started = time.perf_counter()
        result = evaluate_run(s.model, s.tokenizer, split.test, split.train, probe_cfg, s.precision, console)
        probe_total = time.perf_counter() - probe_started
        per_row = sum(c["seconds"] + c["loss_seconds"] for c in result["contenders"].values()) / sample
        eval_seconds = per_row * eval_rows + (probe_total - per_row * sample)

    total = setup_seconds + train_seconds + validation_seconds + eval_seconds
    rep = s.data.report
    return {
        "objective": cfg.objective,
        "rows": rep["splits"],
        "train_rows_used": rep["train_rows_used"],
        "tokens": {"total": total_tokens, "trained": trained_tokens,
                   "per_example": rep["tokens_per_example"]["mean"],
                   "trained_per_example": rep["trained_tokens_per_example"]["mean"]},
        "hyperparameters": {
            **{name: {"value": c.value, "why": c.why} for name, c in s.choices.items()},
            "grad_accumulation": {"value": t.grad_accumulation, "why": "set in the config"},
        },
        "steps": s.steps,
        "probe": {"steps": max(len(probe) - 1, 1), "tokens": probe_tokens, "seconds": probe_seconds,
                  "tokens_per_second": 1 / seconds_per_token if seconds_per_token else None},
        "estimate_seconds": {"setup": setup_seconds, "train": train_seconds, "validation": validation_seconds,
                             "evaluation": eval_seconds, "total": total},
        "evaluation_rows": eval_rows,
        "cost": {"price_per_hour": price_per_hour, "total": price_per_hour * total / 3600},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # measured during the probe
        "precision": s.precision.reason,
    }
