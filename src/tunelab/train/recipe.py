"""Supervised fine-tuning, readable top to bottom: setup (`train/setup.py`) -> loop -> save.

Run it through the CLI:

    tunelab train examples/banking77/demo.yaml                     # LoRA (the default)
    tunelab train examples/banking77/demo.yaml --set tuning=full   # every weight
    torchrun --nproc-per-node 2 -m tunelab train demo.yaml         # two processes (see distributed.py)

Loss is on assistant tokens (and their end-of-turn token) only; the LM head is
computed only at those positions. Methods are branches of the setup, not copies of
this loop: LoRA / DoRA over a frozen base (bf16 when the CPU has AMX, or quantized),
or full fine-tuning (fp32 weights, bf16 autocast). Trainable weights and AdamW
state are always fp32.
"""

from __future__ import annotations

import hashlib
import json
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.model.kernels.compiled import restore_eager
from tunelab.config import RunConfig
from tunelab.data.batches import Batch
from tunelab.data.prepare import PreparedData
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import Interrupted, TunelabError
from tunelab.model.load import ResolvedModel, weights_fingerprint
from tunelab.model.template_canary import record_template
from tunelab.train import distributed
from tunelab.rundir import MANIFEST, RunDir
from tunelab.train.distributed import World
from tunelab.train.dpo import PairBatch, PreparedPairs, dpo_validation
from tunelab.train.early_stop import EarlyStopping
from tunelab.train.loop import Precision, validation_metrics, validation_sums
from tunelab.train.report_to import MetricsExport
from tunelab.train.checkpoint import (
    best_checkpoint, complete_checkpoints, load_checkpoint, load_weights, mark_best, save_checkpoint,
)
from tunelab.train.setup import Setup, setup


@dataclass
class TrainResult:
    run: RunDir
    model: PeftModel | PreTrainedModel  # PreTrainedModel when tuning=full
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData | PreparedPairs
    precision: Precision
    resolved: ResolvedModel
    train_seconds: float
    tokens_per_second: float  # real (non-pad) input tokens per second of training steps
    trained_tokens_per_second: float  # tokens that carry loss, per second
    final_validation_loss: float | None
    world: World
    timings: dict[str, float]  # seconds per stage (load, data, train, ...)


def backward_on(
    loss_module: torch.nn.Module, micro_batches: list[Batch], precision: Precision, world: World = World(),
    weights: list[float] | None = None,
) -> tuple[float, int, dict[str, float]]:
    """Accumulate gradients of one optimizer step.

    Returns the step's mean loss, its loss units (trained tokens; DPO: pairs) over all
    processes, and the step's other statistics as means per unit (DPO: reward margin, ...).

    Each micro-batch's loss *sum* is divided by the units of the whole step (all
    processes), so the gradient equals that of one big batch: accumulation and data
    parallelism are both exact. `loss_module` is `distributed.wrap(model)`; a plain
    model is wrapped here. `weights` (0 or 1 per micro-batch) lets a process with no
    rows of its own join the gradient all-reduce without adding anything.
    """
    if not isinstance(loss_module, (distributed.TokenLoss, torch.nn.parallel.DistributedDataParallel)):
        loss_module = distributed.wrap(loss_module, World())
    weights = weights or [1.0] * len(micro_batches)
    local_units = sum(b.loss_units * w for b, w in zip(micro_batches, weights))
    units = float(distributed.all_reduce_sum(torch.tensor([local_units], dtype=torch.float64), world).item())
    total, sums = 0.0, {}
    for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
        with distributed.sync_gradients(loss_module, last=i == len(micro_batches) - 1):
            with precision.autocast():
                loss_sum, stats = loss_module(batch)
            (loss_sum * (weight * world.size / max(units, 1))).backward()
        total += float(loss_sum.detach()) * weight
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value * weight
    keys = sorted(sums)
    reduced = distributed.all_reduce_sum(torch.tensor([total] + [sums[k] for k in keys], dtype=torch.float64), world)
    means = {k: float(v) / max(units, 1) for k, v in zip(keys, reduced[1:].tolist())}
    return float(reduced[0]) / max(units, 1), int(units), means


def examples_fingerprint(stream: list[list[TokenizedExample]], step: int, accumulation: int) -> str:
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

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, console: Console | None = None, resume: Path | None = None) -> TrainResult:
    """Train; with `resume`, continue that run directory from its newest whole checkpoint.

    Under torchrun every process runs this function; only rank 0 writes files.
    """
    console = console or Console(stderr=True)
    world = distributed.init_from_env()
    if not world.is_main:
        console = Console(stderr=True, quiet=True)  # one log, from rank 0

    # ---------------------------------------------------------------- setup
    if resume is not None:
        require_same_processes(resume, world)
    s = setup(cfg, console, world)
    cfg, t = s.cfg, s.cfg.train  # 'auto' values resolved
    model, tokenizer, data, precision, steps = s.model, s.tokenizer, s.data, s.precision, s.steps
    optimizer, scheduler, val_batches = s.optimizer, s.scheduler, s.val_batches
    resolved, rep = s.resolved, data.report
    loss_module = s.loss_module

    start = 0
    if resume is None:
        run = RunDir.create(cfg.output_dir, cfg.name) if world.is_main else None
        run = RunDir(Path(distributed.broadcast_text(str(run.path) if run else None, world)))
        if world.is_main:
            run.write_json("config.json", cfg.model_dump(mode="json"))  # resolved: no 'auto' left
            run.write_json("data.json", {
                **rep, "base_model": {"spec": cfg.model, "path": str(resolved.path),
                                      "weights": weights_fingerprint(resolved)},
                "hyperparameters": {name: {"value": c.value, "why": c.why} for name, c in s.choices.items()},
                "processes": world.size,
                "chat_template": record_template(tokenizer),  # checked on every load (template_canary.py)
                "lengths": {"tokens": [e.length for e in data.train],
                            "trained_tokens": [e.trained_tokens for e in data.train]},
            })
    else:
        run = RunDir(resume)
        checkpoints = complete_checkpoints(run.path)
        if checkpoints:
            start = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, world)
            require_same_order(run.path, s.stream, start, t.grad_accumulation)
        if world.is_main:
            (run.path / MANIFEST).unlink(missing_ok=True)  # the run changes again: not whole until re-finished
            run.truncate_metrics(after_step=start)  # steps past the checkpoint are redone, so logged again
        console.print(f"[bold]resume[/]: {run.path} from step {start} of {steps}")
    export = MetricsExport.open(t.report_to if world.is_main else [], run.path, cfg.model_dump(mode="json"))

    # ---------------------------------------------------------------- loop
    model.train()
    real_tokens = trained_tokens = 0
    train_seconds = 0.0
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    )
    stop = StopOnSignal()  # SIGINT/SIGTERM: finish this step, checkpoint, exit
    early = EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta,
                                 run.path / "metrics.jsonl", up_to_step=start)
    last_step = start
    with progress, stop:
        task = progress.add_task("train", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start + 1, steps + 1):
            started = time.perf_counter()
            group, weights = s.local_step(step)
            loss, _, step_stats = backward_on(loss_module, group, precision, world, weights)
            step_trained = int(distributed.all_reduce_sum(
                torch.tensor([sum(b.trained_tokens * w for b, w in zip(group, weights))]), world).item())
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
            step_real = int(distributed.all_reduce_sum(
                torch.tensor([sum(b.real_tokens * w for b, w in zip(group, weights))]), world).item())
            real_tokens += step_real
            trained_tokens += step_trained
            record = {
                "step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": step_real, "trained_tokens": step_trained, "tokens_per_s": step_real / elapsed,
                "seconds": elapsed, "peak_memory_mb": peak_memory_mb(), **step_stats,
                "examples": examples_fingerprint(s.stream, step, t.grad_accumulation),
            }
            improved = False
            if t.eval_every and step % t.eval_every == 0 and step < steps and data.validation:
                record.update(validate(s))
                improved = early.update(step, record["val_loss"])
                console.print(f"step {step}: {describe_validation(record)}{' (best)' if improved else ''}")
            if world.is_main:
                run.append_metrics(record)
                export.log(record)
            last_step = step
            progress.update(task, advance=1, loss=loss, tps=real_tokens / train_seconds)
            stop_requested = distributed.any_process(stop.requested is not None, world)
            if (step == steps or (t.checkpoint_every and step % t.checkpoint_every == 0) or stop_requested
                    or improved or early.should_stop):
                save_checkpoint(run.path, step, model, optimizer, scheduler, t.keep_checkpoints, world)  # every rank
                if improved and world.is_main:
                    mark_best(run.path, step, record["val_loss"])
            if early.should_stop:
                console.print(
                    f"[bold]early stop[/] after step {step}: {early.bad} validations without improvement; "
                    f"best was step {early.best_step} (validation loss {early.best:.4f})"
                )
                break
            if stop_requested and step < steps:
                export.close()
                distributed.shutdown(world)
                raise Interrupted(
                    f"stopped by {stop.requested or 'a signal to another process'} after step {step} of {steps}; "
                    "checkpoint saved",
                    fix=f"resume with: tunelab train --resume {run.path}", where=str(run.path),
                )

    # ---------------------------------------------------------------- save
    distributed.barrier(world)  # rank 0's last checkpoint is on disk before anyone reads it
    if early.patience and early.best_step is not None:  # early stopping keeps the best weights, not the last
        load_weights(best_checkpoint(run.path), model)
        console.print(f"[bold]weights[/]: the best checkpoint, step {early.best_step}")
    final_val = validate(s) if data.validation else None
    if final_val is not None:
        console.print(f"[bold]validation[/]: {describe_validation(final_val)}")
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
        if s.sharded:  # rank 0 goes on alone (evaluation): the saved model, whole, instead of its shards
            model = run.load_saved_model()
    return TrainResult(
        run=run, model=model, tokenizer=tokenizer, data=data, precision=precision, resolved=resolved,
        train_seconds=train_seconds, tokens_per_second=real_tokens / max(train_seconds, 1e-9),
        trained_tokens_per_second=trained_tokens / max(train_seconds, 1e-9),
        final_validation_loss=final_val["val_loss"] if final_val else None, world=world,
        timings={**s.timings, "train": train_seconds},
    )


def require_same_processes(run_dir: Path, world: World) -> None:
    """Resume with as many processes as trained the run: the step's examples and its schedule depend on it."""
    data_json = run_dir / "data.json"
    if not data_json.is_file():
        return  # not a run directory: reading its config reports that
    trained = json.loads(data_json.read_text(encoding="utf-8")).get("processes", 1)
    if trained != world.size:
        launch = "tunelab train --resume" + (f" --nproc {trained}" if trained > 1 else "")
        raise TunelabError(
            f"this run trained with {trained} process(es), and resuming it with {world.size} would change which "
            "examples each step holds and the number of steps",
            fix=f"resume with {trained} process(es): {launch} {run_dir}", where=str(data_json),
        )


def require_same_order(run_dir: Path, stream: list[list[TokenizedExample]], start: int, accumulation: int) -> None:
    """Resume only where the rebuilt micro-batch stream gives the steps already trained the examples they had.

    The order is rebuilt, not saved (resume.py): a changed data file, seed or batch size, or a tunelab whose
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
    """Validation over every process's share of the rows: loss and token accuracy (DPO: loss and rewards)."""
    with distributed.gathered(s.loss_module):  # FSDP: the root's embeddings and head whole for the direct calls
        return _validate(s.model, s.val_batches, s.precision, s.world, s.cfg)


def _validate(
    model: torch.nn.Module, val_batches: list[Batch | PairBatch], precision: Precision, world: World, cfg: RunConfig
) -> dict[str, float]:
    if cfg.objective == "dpo":
        # dpo_validation returns means; weight them by this process's pairs so processes can add them up.
        pairs = sum(b.pairs for b in val_batches)
        means = dpo_validation(model, val_batches, cfg.dpo.beta, precision) if val_batches else {}
        keys = ["loss", "reward_margin", "reward_accuracy"]
        sums = torch.tensor([pairs] + [means.get(k, 0.0) * pairs for k in keys], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums, world).tolist()
        return {f"val_{k}": v / max(sums[0], 1) for k, v in zip(keys, sums[1:])}
    return validation_metrics(distributed.all_reduce_sum(validation_sums(model, val_batches, precision), world))


def describe_validation(record: dict[str, float]) -> str:
    if "val_reward_margin" in record:
        return (f"validation loss {record['val_loss']:.4f}, reward margin {record['val_reward_margin']:.3f}, "
                f"reward accuracy {record['val_reward_accuracy']:.1%}")
    return f"validation loss {record['val_loss']:.4f}, token accuracy {record['val_token_accuracy']:.1%}"


def peak_memory_mb() -> float:
    """Peak memory so far: the process's peak RSS on CPU (what the OS charges), allocated bytes on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
