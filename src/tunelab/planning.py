"""`tunelab plan CONFIG` (= `tunelab train CONFIG --dry-run`): what a run will cost, before it runs.

The estimate comes from measuring this machine, not from constants, and takes seconds:

1. the run's own setup (model load, data read, split, tokenize, the compiled kernels' probe) is
   timed for real;
2. a probe runs `probe_steps` real optimizer steps (after one untimed warm-up step) on the run's
   own first micro-batches, and gives seconds per real input token; the run's total real tokens
   (known after tokenizing) times that is the training time;
3. validation: one batch is timed and scaled to the validation rows, times the validations;
4. evaluation: for each contender, a few prompts are decoded for 1 and for a few tokens at two
   batch sizes: that gives the prompt pass per row and a decode step's cost as a function of the
   batch, which are scaled to the rows, the batches and the answer length the evaluation will
   use, plus the reference answers' loss (the validation pass's time per row, scaled to the share of
   answer tokens: the prompts are computed once, by generation); the forgetting probe is estimated
   the same way, its general-text loss timed whole.

Every hyperparameter is shown with where its value came from: set in the config, tunelab's
default, or chosen automatically (and why). Nothing is written: no run directory, no adapter.
The probe's optimizer steps change only the in-memory copy that is thrown away afterwards.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tunelab.config import RunConfig
from tunelab.data.batches import Batch
from tunelab.data.report import DataReport
from tunelab.model.kernels.compiled import restore_eager
from tunelab.model.precision import detect_hardware
from tunelab.training.budget import time_validation_pass, time_validations
from tunelab.training.memory import peak_memory_mb
from tunelab.training.setup import Setup, setup
from tunelab.training.step import backward_on

DEFAULT_PRICE_PER_HOUR = 0.10  # USD; about a 2-vCPU cloud VM. Pass your own with --price-per-hour.
DECODE_PROBE_TOKENS = 3  # decode steps timed per probe (after the prompt pass)


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HyperparameterPlan(_Plan):
    value: float
    source: Literal["config", "default", "auto"]
    why: str


class Tokens(_Plan):
    total: int  # input tokens over the whole run (DPO: both rows of each pair)
    trained: int
    per_example: float
    trained_per_example: float


class Probe(_Plan):
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float | None


class Seconds(_Plan):
    setup: float
    train: float
    validation: float
    evaluation: float
    total: float


class Cost(_Plan):
    price_per_hour: float
    total: float


class Plan(_Plan):
    """`tunelab plan --json`: the plan of one run, measured on this machine."""

    hardware: str
    precision: str
    objective: str
    unit: str  # what one example is: "example" | "pair"
    data: DataReport
    tokens: Tokens
    hyperparameters: dict[str, HyperparameterPlan]
    steps: int
    probe: Probe
    estimate_seconds: Seconds
    evaluation_rows: int
    cost: Cost
    peak_memory_mb: float


def make_plan(cfg: RunConfig, probe_steps: int = 3, price_per_hour: float = DEFAULT_PRICE_PER_HOUR) -> Plan:
    started = time.perf_counter()
    s = setup(cfg)
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
        backward_on(s.loss_module, batches, s.precision)  # the run's loss: the objective's
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        if i > 0 or len(probe) == 1:  # the first step warms caches and allocators: not timed
            probe_seconds += time.perf_counter() - step_started
            probe_tokens += sum(b.real_tokens for b in batches)
    seconds_per_token = probe_seconds / max(probe_tokens, 1)
    train_seconds = s.tokens_to_train * seconds_per_token

    validation_seconds = time_validations(s)
    restore_eager(s.model)  # as training leaves the model for evaluation
    eval_seconds, eval_rows = _evaluation_seconds(s)
    total = setup_seconds + train_seconds + validation_seconds + eval_seconds
    rep = s.data.report
    choices = {name: HyperparameterPlan(value=c.value, source=c.source, why=c.why) for name, c in s.choices.items()}
    choices["grad_accumulation"] = HyperparameterPlan(
        value=t.grad_accumulation, source="config" if "grad_accumulation" in cfg.train.model_fields_set else "default",
        why="set in the config" if "grad_accumulation" in cfg.train.model_fields_set else "tunelab's default")
    return Plan(
        hardware=detect_hardware().describe(), precision=s.precision.reason, objective=cfg.objective,
        unit=s.objective.unit, data=rep,
        tokens=Tokens(total=s.tokens_to_train, trained=sum(e.trained_tokens for mb in s.stream for e in mb),
                      per_example=rep.tokens_per_example.mean, trained_per_example=rep.trained_tokens_per_example.mean),
        hyperparameters=choices, steps=s.steps,
        probe=Probe(steps=max(len(probe) - 1, 1), tokens=probe_tokens, seconds=probe_seconds,
                    tokens_per_second=1 / seconds_per_token if seconds_per_token else None),
        estimate_seconds=Seconds(setup=setup_seconds, train=train_seconds, validation=validation_seconds,
                                 evaluation=eval_seconds, total=total),
        evaluation_rows=eval_rows, cost=Cost(price_per_hour=price_per_hour, total=price_per_hour * total / 3600),
        peak_memory_mb=peak_memory_mb(),  # measured during the probe
    )


def _evaluation_seconds(s: Setup) -> tuple[float, int]:
    """(seconds, rows) of the held-out evaluation, from short timed probes (see the module docstring)."""
    from tunelab.data.tokenize import render_prompt
    from tunelab.evaluation.contenders import _max_new_tokens, contender_prompts
    from tunelab.evaluation.forgetting import _text_batches, load_probe
    from tunelab.evaluation.generate import AUTO_MAX_ROWS
    from tunelab.evaluation.metrics import task_for_metric_setting
    from tunelab.model.scoring import validation_loss

    cfg = s.cfg.eval
    test_rows, train_rows = s.data.held_out()
    if s.cfg.objective != "sft" or not test_rows:  # preference runs score pairs: about one validation pass
        return time_validation_pass(s) if test_rows else 0.0, len(test_rows)
    rows = min(cfg.max_rows or len(test_rows), len(test_rows))
    sample_rows = test_rows[:rows]
    task, _, _ = task_for_metric_setting(cfg.metric, [r.answer for r in train_rows + list(test_rows)])
    labels = sorted({r.answer for r in train_rows + list(test_rows)}) if task == "classification" else None
    prompts, _ = contender_prompts(sample_rows[:16], train_rows, labels, cfg.few_shot, cfg.seed)
    max_new = _max_new_tokens(s.tokenizer, [r.answer for r in sample_rows], labels, cfg)
    batch = cfg.generation_batch or AUTO_MAX_ROWS
    was_training = s.model.training
    s.model.eval()
    seconds = 0.0
    # The reference-answer loss: the answers' tokens on generation's prompt cache, about a validation row's forward
    # scaled to the share of its tokens that are answer (trained) tokens; the same for every contender.
    loss_seconds = (time_validation_pass(s) * rows / max(len(s.data.validation), 1) * _answer_share(s.val_batches)
                    if s.val_batches else 0.0)
    for name, messages in prompts.items():
        if name != "finetune" and not cfg.compare_base:
            continue
        ids = [render_prompt(s.tokenizer, m) for m in messages]
        with _weights(s.model, name):
            seconds += _generation_seconds(s, ids, rows, max_new, batch) + loss_seconds
    if cfg.forgetting_probe and cfg.compare_base:
        probe = [render_prompt(s.tokenizer, [_user(item.prompt)]) for item in load_probe()]
        text = _text_batches(s.tokenizer)
        started = time.perf_counter()
        validation_loss(s.model, text, s.precision)
        text_seconds = time.perf_counter() - started
        for name in ("finetune", "base"):
            with _weights(s.model, name):
                seconds += _generation_seconds(s, probe, len(probe), 48, cfg.generation_batch or AUTO_MAX_ROWS)
            seconds += text_seconds
    s.model.train(was_training)
    return seconds, rows


def _answer_share(batches: list[Batch]) -> float:
    """Trained tokens / real tokens over `batches`: what a loss pass costs when the prompts are already computed."""
    return min(1.0, sum(b.trained_tokens for b in batches) / max(sum(b.real_tokens for b in batches), 1))


def _generation_seconds(s: Setup, prompts: list[list[int]], rows: int, max_new: int, batch: int) -> float:
    """Decoding `rows` prompts like these, `batch` at a time, up to `max_new` tokens each: the prompt pass per
    row and a decode step's cost (linear in the batch, from two sizes) measured on a few prompts."""
    from tunelab.evaluation.generate import generate

    def timed(n: int, new: int) -> float:
        started = time.perf_counter()
        generate(s.model, s.tokenizer, prompts[:n], max_new_tokens=new, batch_size=n, precision=s.precision,
                 stop_token_ids=[])  # never stops early: every row decodes every step
        return time.perf_counter() - started

    small, large = min(4, len(prompts)), min(16, len(prompts))
    timed(small, 1)  # untimed: first calls at a new size allocate
    step = {}
    prefill = 0.0
    for n in dict.fromkeys((small, large)):
        prefill = timed(n, 1)
        step[n] = max(0.0, timed(n, 1 + DECODE_PROBE_TOKENS) - prefill) / DECODE_PROBE_TOKENS
    per_row_prefill = prefill / large
    b = min(batch, rows)
    if large > small:
        slope = max(0.0, (step[large] - step[small]) / (large - small))
        step_at_batch = step[large] + slope * (b - large)
    else:
        step_at_batch = step[small] * b / small
    return rows * per_row_prefill + math.ceil(rows / b) * max(max_new - 1, 0) * step_at_batch


def _weights(model, name: str):  # noqa: ANN001, ANN202 - the contender's weights: adapter off for the base ones
    import contextlib

    from peft import PeftModel

    if name != "finetune" and isinstance(model, PeftModel):
        return model.disable_adapter()
    return contextlib.nullcontext()


def _user(text: str):  # noqa: ANN202
    from tunelab.data.records import Message

    return Message("user", text)
