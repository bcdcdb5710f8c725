"""A run's setup: model, data, adapter, schedule and optimizer, each choice said in the run log.

Shared by the recipe (`recipe.train`) and `tunelab plan`, which times a few real steps of
exactly what training would run. The objective (SFT or DPO) is chosen here, once
(`objectives.objective_for`); everything after asks it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import RunConfig
from tunelab.data.batches import length_grouped_order
from tunelab.data.pack import pack_summary
from tunelab.data.read import Records
from tunelab.errors import TunelabError
from tunelab.model.kernels.compiled import (
    LAYER_COMPILE_TOKENS,
    CompiledKernels,
    is_llama_layer,
    restore_eager,
    use_compiled_kernels,
    use_compiled_layers,
)
from tunelab.model.load import ResolvedModel, attach_lora, decoder_layers, load_model, resolve_model, unfreeze_all
from tunelab.model.precision import Precision, choose_precision, detect_hardware
from tunelab.model.quantize import quantize_base, require_quantization
from tunelab.training import auto, distributed
from tunelab.training.auto import Choice
from tunelab.training.distributed import World
from tunelab.training.objectives import Objective, objective_for
from tunelab.training.step import ObjectiveLoss, backward_on, make_optimizer

log = logging.getLogger(__name__)


def epoch_stream(examples: list, batch_size: int, epochs: float, seed: int) -> list[list]:
    """All micro-batches of the run, in order: each epoch a new length-grouped shuffle."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [e.length for e in examples]
    stream: list[list] = []
    for _ in range(math.ceil(epochs)):
        stream.extend([examples[i] for i in idx] for idx in length_grouped_order(lengths, batch_size, generator))
    per_epoch = math.ceil(len(examples) / batch_size)
    return stream[: max(1, round(per_epoch * epochs))]


@dataclass
class Setup:
    """Everything a run needs before its first step; shared by `train` and `tunelab plan`."""

    model: PeftModel | PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    objective: Objective
    data: object  # what `objective.prepare` returned: PreparedData (SFT) or PreparedPairs (DPO)
    precision: Precision
    resolved: ResolvedModel
    stream: list[list]  # every micro-batch of the run, in order (examples: TokenizedExample or TokenizedPair)
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    val_batches: list  # this process's share of the validation batches
    cfg: RunConfig  # with every 'auto' resolved
    choices: dict[str, Choice]  # why each hyperparameter has its value
    world: World
    timings: dict[str, float]
    loss_module: torch.nn.Module  # what a step calls: the objective's loss, DDP-wrapped or FSDP-sharded under several processes

    @property
    def tokens_to_train(self) -> int:
        """Input tokens over every micro-batch of the run (DPO: both rows of each pair); what `plan` and
        `compile_layers` weigh."""
        return sum(e.input_tokens for mb in self.stream for e in mb)

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.loss_module)

    def collate(self, examples: list) -> object:
        """A micro-batch's tensors: padded rows, packed rows (train.packing) or pair rows, by the objective."""
        return self.objective.collate(examples, self.tokenizer.pad_token_id)

    def local_step(self, step: int) -> tuple[list, list[float]]:
        """This process's micro-batches of optimizer step `step` (1-based), and their weights (0 = a stand-in)."""
        t = self.cfg.train
        batches, weights = [], []
        for mb in self.stream[(step - 1) * t.grad_accumulation : step * t.grad_accumulation]:
            mine = distributed.local_rows(mb, self.world)
            # A process whose share is empty computes a stand-in row with weight 0, so DDP's all-reduce still meets.
            batches.append(self.collate(mine or mb[:1]))
            weights.append(1.0 if mine else 0.0)
        return batches, weights


def choose_parallel(cfg: RunConfig, world: World) -> bool:
    """Whether to shard (FSDP) rather than replicate (DDP); an impossible choice is an error before loading."""
    p = cfg.train.parallel
    if p == "fsdp" and cfg.tuning != "full":
        raise TunelabError(
            "train.parallel: fsdp shards full fine-tuning, but this run trains an adapter (tuning: lora)",
            fix="use train.parallel: ddp (or auto) for adapters, or tuning: full",
        )
    return world.active and (p == "fsdp" or (p == "auto" and cfg.tuning == "full"))


def agreed_precision(setting: str, world: World) -> Precision:
    """The run's precision. `auto` is a timing on a CPU (model/precision.py), and processes timed side by side
    could decide differently; so rank 0 decides alone, and the others take its choice and its reason."""
    if not world.active or setting != "auto":
        return choose_precision(setting)
    mine = choose_precision(setting) if world.is_main else None
    bf16 = distributed.broadcast_flag(mine.bf16 if mine else None, world)
    reason = distributed.broadcast_text(mine.reason if mine else None, world)
    return Precision(bf16, detect_hardware().device, reason if world.is_main else f"{reason} (rank 0's choice)")


def setup(cfg: RunConfig, world: World = World(), records: Records | None = None) -> Setup:
    """Model, data, adapter, schedule: each choice said in the run log. `records`: the data in memory,
    instead of `cfg.data.path`."""
    t = cfg.train
    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = agreed_precision(t.precision, world)
    log.info("precision: %s", precision.reason)
    # Before loading anything: an unavailable method or an impossible combination is a TunelabError.
    require_quantization(cfg.lora.quantize_base, precision.device, tuning=cfg.tuning, use_dora=cfg.lora.use_dora)
    shard = choose_parallel(cfg, world)
    objective = objective_for(cfg, shard)
    kernels = cfg.model.kernels
    resolved = resolve_model(cfg.model.name)
    # Full tuning trains the weights themselves, so they are fp32 (autocast computes in bf16);
    # a frozen base is stored in the compute dtype.
    model, tokenizer = load_model(resolved, dtype=torch.float32 if cfg.tuning == "full" else precision.weights_dtype,
                                  quantize=cfg.lora.quantize_base, kernels=kernels)
    quantized = quantize_base(model, cfg.lora.quantize_base, precision.weights_dtype)
    if quantized:
        log.info("quantized base: %s", quantized.describe())
    model.config.use_cache = False  # no KV cache while training: it would only cost memory
    timings["load_model"] = time.perf_counter() - started

    started = time.perf_counter()
    data = objective.prepare(cfg.data, tokenizer, t.val_rows, records)
    timings["tokenize"] = time.perf_counter() - started
    rep = data.report
    t, choices = auto.resolve(t, len(data.train), rep.tokens_per_example.mean, cfg.tuning, cfg.lora.rank,
                              cfg.lora.use_rslora, model=model, lora=cfg.lora, bf16=precision.bf16,
                              shards=world.size if shard else 1, max_tokens=rep.tokens_per_example.max,
                              max_trained_tokens=rep.trained_tokens_per_example.max)
    cfg = cfg.model_copy(update={"train": t})
    for name, choice in choices.items():
        if choice.source == "auto":
            log.info("auto %s: %g (%s)", name, choice.value, choice.why)
    log.info("data: %s rows -> split %s (%s); training on %s %ss, %.1f tokens/%s of which %.1f trained "
             "(assistant answer + end-of-turn)%s", f"{rep.rows:,}", rep.splits,
             "stratified by label" if rep.stratified else "not stratified", f"{rep.train_rows_used:,}",
             objective.unit, rep.tokens_per_example.mean, objective.unit, rep.trained_tokens_per_example.mean,
             f"; dropped {rep.dropped_too_long.count} longer than {cfg.data.max_length}"
             if rep.dropped_too_long.count else "")

    if cfg.tuning == "full":
        model = unfreeze_all(model)
        method = "full fine-tuning (every weight, fp32 + bf16 autocast)" if precision.bf16 else "full fine-tuning"
    else:
        model = attach_lora(model, cfg.lora, kernels)
        method = (
            f"{'DoRA' if cfg.lora.use_dora else 'LoRA'}{' (rsLoRA scaling)' if cfg.lora.use_rslora else ''} "
            f"r={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {cfg.lora.target_modules}"
            + (f" in the last {cfg.lora.top_layers} of {len(decoder_layers(model))} layers (backward stops there)"
               if cfg.lora.top_layers else "")
        )
    model = objective.check_model(model)
    compiled = None
    if t.compile_kernels and kernels == "tunelab":
        started = time.perf_counter()
        compiled = use_compiled_kernels(model, torch.bfloat16 if precision.bf16 else None)
        timings["compile"] = time.perf_counter() - started
        log.info("kernels: %s", compiled.describe()
                 + ("" if compiled.unavailable else f" (compiled in {timings['compile']:.1f} s)"))
    elif kernels == "reference":
        log.info("kernels: reference (plain PEFT and transformers modules, nothing compiled)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s + %s (%.2fM trainable parameters); %s", cfg.model.name, method, trainable / 1e6,
             objective.describe())

    # The stream is built for the global micro-batch (all processes), so N processes x batch b
    # see the same examples per step as one process at batch N*b.
    stream = epoch_stream(data.train, t.batch_size * world.size, t.epochs, t.seed)
    steps = math.ceil(len(stream) / t.grad_accumulation)
    warmup = round(t.warmup_ratio * steps)
    # The loss module before the optimizer: FSDP replaces the parameters by their shards.
    loss_module = distributed.wrap(ObjectiveLoss(model, objective), world, shard=shard)
    if world.active:
        log.info("parallel: %d processes, %s", world.size,
                 "FSDP: weights, gradients and AdamW state sharded per decoder layer" if shard
                 else "DDP: the model replicated, gradients averaged")
    optimizer, scheduler = make_optimizer(model, t.learning_rate, t.weight_decay, steps, warmup, t.schedule)
    val_batches = [
        objective.collate_validation(data.validation[i : i + t.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(data.validation), t.batch_size)
    ][world.rank :: world.size]
    log.info("schedule: %d steps x %d %ss%s x %d accumulation, lr %g (warmup %d, %s), %g epoch(s)", steps,
             t.batch_size, objective.unit, f" x {world.size} processes" if world.active else "", t.grad_accumulation,
             t.learning_rate, warmup, t.schedule, t.epochs)
    s = Setup(model, tokenizer, objective, data, precision, resolved, stream, steps, optimizer, scheduler, val_batches,
              cfg, choices, world, timings, loss_module)
    _compile_layers(s, compiled)
    if t.packing and cfg.objective == "sft":
        width = (f"at most {t.pack_length} tokens (or the longest example)" if t.pack_length
                 else "as wide as the micro-batch's longest example")
        summary = pack_summary(stream, t.pack_length, share_prefix=not s.sharded)
        log.info("packing: rows %s; %s", width, summary.describe())
    return s


def _why_layers_stay_eager(s: Setup, compiled: CompiledKernels | None) -> str | None:
    """Why `train.compile_layers` leaves the decoder layers eager in this run, or None to compile them."""
    cfg, t = s.cfg, s.cfg.train
    if t.compile_layers is False:
        return "off in the config"
    if compiled is None or compiled.unavailable:
        return "torch.compile is off or unavailable (see kernels)"
    # DoRA: its layers compiled were slower than eager (docs/benchmarks.md).
    if cfg.objective != "sft" or cfg.tuning != "lora" or cfg.lora.use_dora:
        return "compiled layers are measured and tested for LoRA SFT only (not DoRA, not DPO, not full tuning)"
    if s.world.active:  # each process would compile on the run's 2 cores at once, and DDP's hooks see the probe
        return "several processes"
    layers = decoder_layers(s.model)
    if not layers or not all(is_llama_layer(layer) for layer in layers):
        return "not a Llama-family decoder (its layers have not been traced here)"
    if t.compile_layers == "auto" and s.tokens_to_train < LAYER_COMPILE_TOKENS:
        return (f"auto: {s.tokens_to_train:,} tokens to train, under {LAYER_COMPILE_TOKENS:,}: the ~35 s compile would cost "
                "about what it saves (train.compile_layers: true compiles anyway)")
    return None


def _compile_layers(s: Setup, compiled: CompiledKernels | None) -> None:
    """Compile the whole decoder layers (`kernels.compiled.use_compiled_layers`) when it pays, and pay the compile
    now: one forward and backward of the first micro-batch, whose gradients are then dropped."""
    why = _why_layers_stay_eager(s, compiled)
    if why is not None:
        log.info("layers: eager (%s)", why)
        return
    layers = decoder_layers(s.model)
    started = time.perf_counter()
    use_compiled_layers(layers)
    s.model.train()  # the mode every step runs in (a graph is specialised to it)
    try:
        backward_on(s.loss_module, [s.collate(s.stream[0])], s.precision)  # a training step's forward and backward
    except Exception as error:  # noqa: BLE001 - a layer that cannot compile trains eager, and the log says why
        for layer in layers:
            restore_eager(layer)
        log.info("layers: eager (torch.compile failed: %s: %s)", type(error).__name__,
                 str(error).splitlines()[0][:160] if str(error) else "")
        return
    finally:
        s.model.zero_grad(set_to_none=True)
    s.timings["compile_layers"] = time.perf_counter() - started
    log.info("layers: torch.compile fuses each of the %d decoder layers (%s tokens to train; compiled in %.1f s)",
             len(layers), f"{s.tokens_to_train:,}", s.timings["compile_layers"])
