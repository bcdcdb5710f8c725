"""Training, readable top to bottom: setup (`setup.py`) -> loop -> save. Every method and objective runs here.

    import tunelab as tl
    run = tl.train(tl.load_config("examples/banking77/demo.yaml"))     # or: tunelab train demo.yaml
    torchrun --nproc-per-node 2 -m tunelab train demo.yaml              # two processes (see distributed.py)

Methods are branches of the setup, not copies of this loop: LoRA / DoRA over a frozen base
(in bf16 where the hardware multiplies bf16 fast, or quantized), or full fine-tuning (fp32
weights, bf16 autocast). The objective (SFT or DPO, `objectives/`) supplies the loss and the
validation. Trainable weights and AdamW state are always fp32. The run directory is whole
when this returns: adapter (or model), tokenizer, config, data report, metrics, checkpoints,
manifest; evaluation (`pipeline.py`) adds eval.json and the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from rich.progress import TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import RunConfig
from tunelab.data.read import Records, records_bytes
from tunelab.errors import Interrupted, TunelabError
from tunelab.io import MANIFEST, write_bytes_atomic
from tunelab.model.kernels.compiled import restore_eager
from tunelab.model.load import ResolvedModel, load_weights, weights_fingerprint
from tunelab.model.precision import Precision
from tunelab.model.template_canary import record_template
from tunelab.progress import bar
from tunelab.rundir import BaseModelIdentity, Hyperparameter, Lengths, RunData, RunDir
from tunelab.training import distributed
from tunelab.training.budget import budget_check, time_validations
from tunelab.training.checkpoint import (
    best_checkpoint,
    complete_checkpoints,
    load_checkpoint,
    mark_best,
    save_checkpoint,
)
from tunelab.training.checkpoint import load_weights as load_checkpoint_weights
from tunelab.training.distributed import World
from tunelab.training.early_stop import EarlyStopping
from tunelab.training.memory import peak_memory_mb
from tunelab.training.report_to import MetricsExport
from tunelab.training.setup import Setup, setup
from tunelab.training.step import backward_on

log = logging.getLogger(__name__)
RECORDS = "records.jsonl"  # the data of a run trained from records in memory


@dataclass
class TrainResult:
    run: RunDir
    model: PeftModel | PreTrainedModel  # PreTrainedModel when tuning=full; in eval mode, every kernel eager
    tokenizer: PreTrainedTokenizerBase
    setup: Setup
    train_seconds: float
    tokens_per_second: float  # real (non-pad) input tokens per second of training steps
    trained_tokens_per_second: float  # tokens that carry loss, per second
    final_validation_loss: float | None
    timings: dict[str, float]  # seconds per stage (load, data, train, ...)

    @property
    def world(self) -> World:
        return self.setup.world

    @property
    def data(self) -> object:
        """What the objective prepared (PreparedData for SFT, PreparedPairs for DPO)."""
        return self.setup.data

    @property
    def precision(self) -> Precision:
        return self.setup.precision

    @property
    def resolved(self) -> ResolvedModel:
        return self.setup.resolved


def train(cfg: RunConfig, resume: Path | None = None, records: Records | None = None) -> TrainResult:
    """Train; with `resume`, continue that run directory from its newest whole checkpoint. `records`: the
    data in memory instead of `cfg.data.path` (a resumed run needs the same records again).

    Under torchrun every process runs this function; only rank 0 writes files.
    """
    world = distributed.init_from_env()
    if not world.is_main:
        logging.getLogger("tunelab").setLevel(logging.WARNING)  # one run log, from rank 0

    # ---------------------------------------------------------------- setup
    if resume is not None:
        require_same_processes(resume, world)
    setup_started = time.perf_counter()
    s = setup(cfg, world, records)
    setup_seconds = time.perf_counter() - setup_started
    cfg, t = s.cfg, s.cfg.train  # 'auto' values resolved
    model, tokenizer, data, objective = s.model, s.tokenizer, s.data, s.objective
    optimizer, scheduler = s.optimizer, s.scheduler

    start = 0
    if resume is None:
        run = RunDir.create(cfg.output_dir, cfg.name) if world.is_main else None
        run = RunDir(Path(distributed.broadcast_text(str(run.path) if run else None, world)))
        if records is not None:  # kept with the run: resuming and `tunelab eval` read them from there
            cfg = keep_records(s, run, records)
        if world.is_main:
            run.write_json("config.json", cfg.model_dump(mode="json"))  # resolved: no 'auto' left
            run.write_json("data.json", run_data(s).model_dump(mode="json"))
    else:
        run = RunDir(resume)
        checkpoints = complete_checkpoints(run.path)
        if checkpoints:
            start = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, world)
            require_same_order(run.path, s.stream, start, t.grad_accumulation)
        if world.is_main:
            (run.path / MANIFEST).unlink(missing_ok=True)  # the run changes again: not whole until re-finished
            run.truncate_metrics(after_step=start)  # steps past the checkpoint are redone, so logged again
        log.info("resume: %s from step %d of %d", run.path, start, s.steps)
    export = MetricsExport.open(t.report_to if world.is_main else [], run.path, cfg.model_dump(mode="json"))

    # ---------------------------------------------------------------- loop
    model.train()
    real_tokens = trained_tokens = 0
    train_seconds = 0.0
    stop = StopOnSignal()  # SIGINT/SIGTERM: finish this step, checkpoint, exit
    early = EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta,
                                 run.path / "metrics.jsonl", up_to_step=start)
    last_step = start
    budget = None if resume is not None or not world.is_main else budget_check(
        t.time_budget_minutes, setup_seconds, s.tokens_to_train,
        round(sum(len(mb) for mb in s.stream) / t.epochs), "bf16" if s.precision.bf16 else "fp32",
        validations=None if world.active else (lambda: time_validations(s)))
    columns = (TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TextColumn("eta"), TimeRemainingColumn())
    with bar("train", s.steps, *columns, fields={"loss": float("nan"), "tps": 0.0}, completed=start) as (
            progress, task), stop:
        for step in range(start + 1, s.steps + 1):
            started = time.perf_counter()
            group, weights = s.local_step(step)
            loss, _, step_stats = backward_on(s.loss_module, group, s.precision, world, weights)
            # Before the optimizer writes it into the weights (and every later step). The loss is the whole step's,
            # reduced over processes in backward_on, so every process sees it and stops at the same step.
            if not math.isfinite(loss):
                export.close()
                raise TunelabError(
                    f"the training loss is {loss} at step {step} of {s.steps} ({s.precision.reason})",
                    fix="rerun with --set model.kernels=reference (plain PEFT and transformers) to rule out tunelab's "
                    "kernels, or clear torch.compile's cache (/tmp/torchinductor_$USER) if this machine's CPU "
                    "settings changed; lower train.learning_rate if the loss grew before",
                    where=str(run.path))
            step_trained = _sum_over_processes([b.trained_tokens * w for b, w in zip(group, weights)], world)
            grad_norm = None
            if t.max_grad_norm is not None:
                grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], t.max_grad_norm
                )))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            step_real = _sum_over_processes([b.real_tokens * w for b, w in zip(group, weights)], world)
            real_tokens += step_real
            trained_tokens += step_trained
            record = {
                "step": step, "total_steps": s.steps, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": step_real, "trained_tokens": step_trained, "tokens_per_s": step_real / elapsed,
                "seconds": elapsed, "peak_memory_mb": peak_memory_mb(), **step_stats,
                "examples": examples_fingerprint(s.stream, step, t.grad_accumulation),
            }
            improved = False
            if t.eval_every and step % t.eval_every == 0 and step < s.steps and data.validation:
                record.update(validate(s))
                improved = early.update(step, record["val_loss"])
                log.info("step %d: %s%s", step, objective.describe_validation(record), " (best)" if improved else "")
            if world.is_main:
                run.append_metrics(record)
                export.log(record)
            last_step = step
            progress.update(task, advance=1, loss=loss, tps=real_tokens / train_seconds)
            if budget and (over := budget.observe(elapsed, step_real)):
                log.warning("%s", over)
            stop_requested = distributed.any_process(stop.requested is not None, world)
            if (step == s.steps or (t.checkpoint_every and step % t.checkpoint_every == 0) or stop_requested
                    or improved or early.should_stop):
                save_checkpoint(run.path, step, model, optimizer, scheduler, t.keep_checkpoints, world)  # every rank
                if improved and world.is_main:
                    mark_best(run.path, step, record["val_loss"])
            if early.should_stop:
                log.info("early stop after step %d: %d validations without improvement; best was step %d "
                         "(validation loss %.4f)", step, early.bad, early.best_step, early.best)
                break
            if stop_requested and step < s.steps:
                export.close()
                s.loss_module = distributed.unwrap(s.loss_module)  # before leaving the group (see unwrap)
                distributed.shutdown(world)
                raise Interrupted(
                    f"stopped by {stop.requested or 'a signal to another process'} after step {step} of {s.steps}; "
                    "checkpoint saved",
                    fix=f"resume with: tunelab train --resume {run.path}", where=str(run.path),
                )

    # ---------------------------------------------------------------- save
    distributed.barrier(world)  # rank 0's last checkpoint is on disk before anyone reads it
    if early.patience and early.best_step is not None:  # early stopping keeps the best weights, not the last
        load_checkpoint_weights(best_checkpoint(run.path), model)
        log.info("weights: the best checkpoint, step %d", early.best_step)
    final_val = validate(s) if data.validation else None
    if final_val is not None:
        log.info("validation: %s", objective.describe_validation(final_val))
    restore_eager(model)  # evaluation and serving run the model's own forwards, as a loaded run does
    model.eval()
    # Sharded weights are gathered whole (every process takes part) for rank 0 to save.
    state = distributed.full_state_dict(model) if s.sharded else None
    if world.is_main:
        if final_val is not None:
            run.append_metrics({"step": last_step, **final_val})
        run.save_trained(model, state_dict=state)
        run.save_tokenizer(tokenizer)
        export.close()
        run.write_manifest()  # whole: evaluation (pipeline.py) adds eval.json and rewrites it
        if s.sharded:  # rank 0 goes on alone (evaluation): the saved model, whole, instead of its shards
            model = load_weights(run.path / "model", torch.float32, cfg.model.kernels).eval()
    s.loss_module = distributed.unwrap(s.loss_module)  # the caller leaves the process group next (see unwrap)
    return TrainResult(
        run=run, model=model, tokenizer=tokenizer, setup=s, train_seconds=train_seconds,
        tokens_per_second=real_tokens / max(train_seconds, 1e-9),
        trained_tokens_per_second=trained_tokens / max(train_seconds, 1e-9),
        final_validation_loss=final_val["val_loss"] if final_val else None,
        timings={**s.timings, "train": train_seconds},
    )


def keep_records(s: Setup, run: RunDir, records: Records) -> RunConfig:
    """Write records passed in memory into the run (records.jsonl) and point the run's config at that file."""
    saved = run.path / RECORDS
    if s.world.is_main:
        write_bytes_atomic(saved, records_bytes(records))
    s.cfg = s.cfg.model_copy(update={"data": s.cfg.data.model_copy(update={"path": saved, "format": "auto"})})
    s.data.report = s.data.report.model_copy(update={"path": str(saved)})
    return s.cfg


def run_data(s: Setup) -> RunData:
    """data.json: the data report and what the run is trained with (written before the first step)."""
    cfg = s.cfg
    return RunData(
        **s.data.report.model_dump(),
        base_model=BaseModelIdentity(spec=cfg.model.name, path=str(s.resolved.path),
                                     weights=weights_fingerprint(s.resolved)),
        hyperparameters={name: Hyperparameter(value=c.value, why=c.why, source=c.source)
                         for name, c in s.choices.items()},
        processes=s.world.size,
        chat_template=record_template(s.tokenizer),
        lengths=Lengths(tokens=[e.length for e in s.data.train], trained_tokens=[e.trained_tokens for e in s.data.train]),
    )


def _sum_over_processes(values: list[float], world: World) -> int:
    return int(distributed.all_reduce_sum(torch.tensor([sum(values)]), world).item())


def examples_fingerprint(stream: list[list], step: int, accumulation: int) -> str:
    """Which examples a step trained on (their sources, hashed): resume must replay the same order."""
    sources = [e.source for mb in stream[(step - 1) * accumulation : step * accumulation] for e in mb]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


class StopOnSignal:
    """Within `with`: SIGINT/SIGTERM set `requested` instead of killing; the loop stops after its step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def require_same_processes(run_dir: Path, world: World) -> None:
    """Resume with as many processes as trained the run: the step's examples and its schedule depend on it."""
    if not (run_dir / "data.json").is_file():
        return  # not a run directory: reading its config reports that
    trained = RunDir(run_dir).data().processes
    if trained != world.size:
        launch = "tunelab train --resume" + (f" --nproc {trained}" if trained > 1 else "")
        raise TunelabError(
            f"this run trained with {trained} process(es), and resuming it with {world.size} would change which "
            "examples each step holds and the number of steps",
            fix=f"resume with {trained} process(es): {launch} {run_dir}", where=str(run_dir / "data.json"),
        )


def require_same_order(run_dir: Path, stream: list[list], start: int, accumulation: int) -> None:
    """Resume only where the rebuilt micro-batch stream gives the steps already trained the examples they had.

    The order is rebuilt, not saved (checkpoint.py): a changed data file, seed or batch size, or a tunelab whose
    batching changed (a version that puts the largest batch first), would make the rest of the run train on
    another order than the one that reached the checkpoint. Each step's metrics line holds its fingerprint."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line a killed run left half-written (steps past the checkpoint)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if "examples" not in record or not isinstance(step, int) or not 1 <= step <= start:
            continue
        if record["examples"] != examples_fingerprint(stream, step, accumulation):
            raise TunelabError(
                f"step {step} trained on other examples than this run's data and config now give it, so resuming "
                f"from step {start} would not continue the same run (the data, the seed, the batch size or "
                "tunelab's batching changed since)",
                fix="resume with the data and config the run started with and the tunelab version that trained "
                    "it, or start a new run", where=f"{metrics}:{number}",
            )


def validate(s: Setup) -> dict[str, float]:
    """Validation over every process's share of the rows, by the objective (SFT: loss and token accuracy;
    DPO: loss and rewards)."""
    with distributed.gathered(s.loss_module):  # FSDP: the root's embeddings and head whole for the direct calls
        sums = s.objective.validation_sums(s.model, s.val_batches, s.precision)
    return s.objective.validation_metrics(distributed.all_reduce_sum(sums, s.world))
