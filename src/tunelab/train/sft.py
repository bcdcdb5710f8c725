"""LoRA supervised fine-tuning, readable top to bottom: setup -> loop -> save.

Run it through the CLI:

    tunelab train examples/banking77/demo.yaml      # train, evaluate, write the run directory

Loss is on assistant tokens (and their end-of-turn token) only; the LM head is
computed only at those positions. Base weights are frozen (bf16 when the CPU has
AMX); LoRA weights and AdamW state are fp32.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedTokenizerBase

from tunelab.config import RunConfig
from tunelab.data.batches import Batch, collate, length_grouped_order
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.tokenize import TokenizedExample
from tunelab.models import ResolvedModel, attach_lora, load_model, resolve_model, weights_fingerprint
from tunelab.train import auto
from tunelab.train.auto import Choice
from tunelab.errors import Interrupted
from tunelab.train.checkpoint import MANIFEST, RunDir
from tunelab.train.early_stop import EarlyStopping
from tunelab.train.resume import (
    best_checkpoint, complete_checkpoints, load_checkpoint, load_weights, mark_best, save_checkpoint,
)
from tunelab.train.loop import Precision, choose_precision, make_optimizer, token_loss_sum, validation_loss


@dataclass
class TrainResult:
    run: RunDir
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    precision: Precision
    resolved: ResolvedModel
    train_seconds: float
    tokens_per_second: float  # real (non-pad) input tokens per second of training steps
    trained_tokens_per_second: float  # tokens that carry loss, per second
    final_validation_loss: float | None


def backward_on(model: PeftModel, micro_batches: list[Batch], precision: Precision) -> float:
    """Accumulate gradients of one optimizer step; returns the step's mean loss per trained token.

    Each micro-batch's loss *sum* is divided by the trained tokens of the whole
    step, so the gradient equals that of one big batch (accumulation is exact).
    """
    step_tokens = sum(b.trained_tokens for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        with precision.autocast():
            loss_sum, _ = token_loss_sum(model, batch)
        (loss_sum / step_tokens).backward()
        total += float(loss_sum.detach())
    return total / max(step_tokens, 1)


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


def epoch_stream(
    examples: list[TokenizedExample], batch_size: int, epochs: float, seed: int
) -> list[list[TokenizedExample]]:
    """All micro-batches of the run, in order: each epoch a new length-grouped shuffle."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(e.input_ids) for e in examples]
    stream: list[list[TokenizedExample]] = []
    for _ in range(math.ceil(epochs)):
        stream.extend([examples[i] for i in idx] for idx in length_grouped_order(lengths, batch_size, generator))
    per_epoch = math.ceil(len(examples) / batch_size)
    return stream[: max(1, round(per_epoch * epochs))]


@dataclass
class Setup:
    """Everything a run needs before its first step; shared by `train` and `tunelab plan`."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    precision: Precision
    resolved: ResolvedModel
    stream: list[list[TokenizedExample]]  # every micro-batch of the run, in order
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    val_batches: list[Batch]
    cfg: RunConfig  # with every 'auto' resolved
    choices: dict[str, Choice]  # why each hyperparameter has its value


def setup(cfg: RunConfig, console: Console) -> Setup:
    """Model, data, adapter, schedule: each choice said in the run log."""
    t = cfg.train
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = choose_precision(t.precision)
    console.print(f"[bold]precision[/]: {precision.reason}")
    resolved = resolve_model(cfg.model)
    model, tokenizer = load_model(resolved, dtype=precision.weights_dtype)
    model.config.use_cache = False  # no KV cache while training: it would only cost memory

    data = prepare_data(cfg.data, tokenizer, val_rows=t.val_rows)
    rep = data.report
    t, choices = auto.resolve(t, len(data.train), rep["tokens_per_example"]["mean"])
    cfg = cfg.model_copy(update={"train": t})
    for name, choice in choices.items():
        if choice.why != "set in the config":
            console.print(f"[bold]auto {name}[/]: {choice.value:g} ({choice.why})")
    console.print(
        f"[bold]data[/]: {rep['rows']:,} rows -> split {rep['splits']} "
        f"({'stratified by label' if rep['stratified'] else 'not stratified'}); training on {rep['train_rows_used']:,} "
        f"rows, {rep['tokens_per_example']['mean']:.1f} tokens/example of which "
        f"{rep['trained_tokens_per_example']['mean']:.1f} trained (assistant answer + end-of-turn)"
        + (f"; dropped {rep['dropped_too_long']['count']} longer than {cfg.data.max_length}" if rep["dropped_too_long"]["count"] else "")
    )

    model = attach_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(
        f"[bold]model[/]: {cfg.model} + {'DoRA' if cfg.lora.use_dora else 'LoRA'}"
        f"{' (rsLoRA scaling)' if cfg.lora.use_rslora else ''} r={cfg.lora.rank} alpha={cfg.lora.alpha:g} "
        f"on {cfg.lora.target_modules} "
        f"({trainable / 1e6:.2f}M trainable parameters)"
    )

    stream = epoch_stream(data.train, t.batch_size, t.epochs, t.seed)
    steps = math.ceil(len(stream) / t.grad_accumulation)
    warmup = round(t.warmup_ratio * steps)
    optimizer, scheduler = make_optimizer(model, t.learning_rate, t.weight_decay, steps, warmup)
    val_batches = [
        collate(data.validation[i : i + t.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(data.validation), t.batch_size)
    ]
    console.print(
        f"[bold]schedule[/]: {steps} steps x {t.batch_size} examples x {t.grad_accumulation} accumulation, "
        f"lr {t.learning_rate:g} (warmup {warmup}, cosine), {t.epochs:g} epoch(s)"
    )
    return Setup(model, tokenizer, data, precision, resolved, stream, steps, optimizer, scheduler, val_batches,
                 cfg, choices)


def train(cfg: RunConfig, console: Console | None = None, resume: Path | None = None) -> TrainResult:
    """Train; with `resume`, continue that run directory from its newest whole checkpoint."""
    console = console or Console(stderr=True)

    # ---------------------------------------------------------------- setup
    s = setup(cfg, console)
    cfg, t = s.cfg, s.cfg.train  # 'auto' values resolved
    model, tokenizer, data, precision, stream, steps = s.model, s.tokenizer, s.data, s.precision, s.stream, s.steps
    optimizer, scheduler, val_batches, pad_id = s.optimizer, s.scheduler, s.val_batches, tokenizer.pad_token_id
    resolved, rep = s.resolved, data.report

    start = 0
    if resume is None:
        run = RunDir.create(cfg.output_dir, cfg.name)
        run.write_json("config.json", cfg.model_dump(mode="json"))  # resolved: no 'auto' left
        run.write_json(
            "data.json",
            {**rep, "base_model": {"spec": cfg.model, "path": str(resolved.path),
                                   "weights": weights_fingerprint(resolved)},
             "hyperparameters": {name: {"value": c.value, "why": c.why} for name, c in s.choices.items()}},
        )
    else:
        run = RunDir(resume)
        (run.path / MANIFEST).unlink(missing_ok=True)  # the run changes again: not whole until re-finished
        checkpoints = complete_checkpoints(run.path)
        if checkpoints:
            start = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        run.truncate_metrics(after_step=start)  # steps past the checkpoint are redone, so logged again
        console.print(f"[bold]resume[/]: {run.path} from step {start} of {steps}")

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
            group = [collate(mb, pad_id) for mb in stream[(step - 1) * t.grad_accumulation : step * t.grad_accumulation]]
            loss = backward_on(model, group, precision)
            grad_norm = None
            if t.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], t.max_grad_norm
                ))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            step_real = sum(b.real_tokens for b in group)
            real_tokens += step_real
            trained_tokens += sum(b.trained_tokens for b in group)
            record = {
                "step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens": step_real, "tokens_per_s": step_real / elapsed, "seconds": elapsed,
                "examples": examples_fingerprint(stream, step, t.grad_accumulation),
            }
            improved = False
            if t.eval_every and step % t.eval_every == 0 and step < steps and val_batches:
                record["val_loss"] = validation_loss(model, val_batches, precision)
                improved = early.update(step, record["val_loss"])
                console.print(f"step {step}: validation loss {record['val_loss']:.4f}{' (best)' if improved else ''}")
            run.append_metrics(record)
            last_step = step
            progress.update(task, advance=1, loss=loss, tps=real_tokens / train_seconds)
            if (step == steps or (t.checkpoint_every and step % t.checkpoint_every == 0) or stop.requested
                    or improved or early.should_stop):
                save_checkpoint(run.path, step, model, optimizer, scheduler, t.keep_checkpoints)
                if improved:
                    mark_best(run.path, step, record["val_loss"])
            if early.should_stop:
                console.print(
                    f"[bold]early stop[/] after step {step}: {early.bad} validations without improvement; "
                    f"best was step {early.best_step} (validation loss {early.best:.4f})"
                )
                break
            if stop.requested and step < steps:
                raise Interrupted(
                    f"stopped by {stop.requested} after step {step} of {steps}; checkpoint saved",
                    fix=f"resume with: tunelab train --resume {run.path}", where=str(run.path),
                )

    # ---------------------------------------------------------------- save
    if early.patience and early.best_step is not None:  # early stopping keeps the best weights, not the last
        load_weights(best_checkpoint(run.path), model)
        console.print(f"[bold]adapter[/]: the best checkpoint, step {early.best_step}")
    final_val = validation_loss(model, val_batches, precision) if val_batches else None
    if final_val is not None:
        run.append_metrics({"step": last_step, "val_loss": final_val})
        console.print(f"[bold]validation loss[/]: {final_val:.4f}")
    model.eval()
    run.save_adapter(model)
    run.save_tokenizer(tokenizer)
    return TrainResult(
        run=run, model=model, tokenizer=tokenizer, data=data, precision=precision, resolved=resolved,
        train_seconds=train_seconds, tokens_per_second=real_tokens / max(train_seconds, 1e-9),
        trained_tokens_per_second=trained_tokens / max(train_seconds, 1e-9), final_validation_loss=final_val,
    )
