"""A run's setup: model, data, adapter, schedule and optimizer, each choice said in the run log.

Shared by `tunelab train` (`sft.train`) and `tunelab plan`, which times a few real steps
of exactly what training would run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from peft import PeftModel
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.cli import allocator
from tunelab.model.kernels.compiled import (
    LAYER_COMPILE_TOKENS, CompiledKernels, is_llama_layer, restore_eager, use_compiled_kernels, use_compiled_layers,
)
from tunelab.config import RunConfig
from tunelab.data.batches import Batch, collate, length_grouped_order
from tunelab.data.pack import collate_packed, pack_summary
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import TunelabError
from tunelab.model.load import ResolvedModel, attach_lora, load_model, resolve_model, unfreeze_all
from tunelab.model.quantize import quantize_base, require_quantization
from tunelab.train import auto, distributed
from tunelab.train.auto import Choice
from tunelab.train.distributed import World
from tunelab.train.dpo import PairBatch, PreparedPairs, TokenizedPair, collate_pairs, prepare_preference_data, require_adapter
from tunelab.train.loop import Precision, body_and_head, choose_precision, make_optimizer

Example = TokenizedExample | TokenizedPair  # one row of SFT, or one preference pair of DPO


def epoch_stream(
    examples: list[Example], batch_size: int, epochs: float, seed: int
) -> list[list[Example]]:
    """All micro-batches of the run, in order: each epoch a new length-grouped shuffle."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [e.length for e in examples]
    stream: list[list[TokenizedExample]] = []
    for _ in range(math.ceil(epochs)):
        stream.extend([examples[i] for i in idx] for idx in length_grouped_order(lengths, batch_size, generator))
    per_epoch = math.ceil(len(examples) / batch_size)
    return stream[: max(1, round(per_epoch * epochs))]


@dataclass
class Setup:
    """Everything a run needs before its first step; shared by `train` and `tunelab plan`."""

    model: PeftModel | PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData | PreparedPairs
    precision: Precision
    resolved: ResolvedModel
    stream: list[list[Example]]  # every micro-batch of the run, in order
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    val_batches: list[Batch | PairBatch]  # this process's share of the validation batches
    cfg: RunConfig  # with every 'auto' resolved
    choices: dict[str, Choice]  # why each hyperparameter has its value
    world: World
    timings: dict[str, float]
    loss_module: torch.nn.Module  # what a step calls: the model's loss, DDP-wrapped or FSDP-sharded under several processes

    @property
    def tokens_to_train(self) -> int:
        """Input tokens over every micro-batch of the run (DPO: both rows of each pair); what `plan` and
        `compile_layers` weigh."""
        return sum(e.input_tokens for mb in self.stream for e in mb)

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.loss_module)

    def collate(self, examples: list[Example]) -> Batch | PairBatch:
        """A micro-batch's tensors: padded rows, or packed rows (train.packing) holding the same examples."""
        t = self.cfg.train
        if self.cfg.objective == "dpo":
            return collate_pairs(examples, self.tokenizer.pad_token_id)
        # FSDP: no shared-prefix pass. Its decoder layers run twice per step, and the prefix's output lives
        # only in the KV cache, where FSDP's pre-backward hook never sees it: backward would find the layer's
        # gathered weights already freed.
        if t.packing:
            return collate_packed(examples, self.tokenizer.pad_token_id, t.pack_length, share_prefix=not self.sharded)
        return collate(examples, self.tokenizer.pad_token_id, share_prefix=not self.sharded)

    def local_step(self, step: int) -> tuple[list[Batch | PairBatch], list[float]]:
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


def setup(cfg: RunConfig, console: Console, world: World = World()) -> Setup:
    """Model, data, adapter, schedule: each choice said in the run log."""
    t = cfg.train
    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    precision = choose_precision(t.precision)
    console.print(f"[bold]precision[/]: {precision.reason}")
    # Before loading anything: an unavailable method or an impossible combination is a TunelabError.
    require_quantization(cfg.lora.quantize_base, precision.device, tuning=cfg.tuning, use_dora=cfg.lora.use_dora)
    shard = choose_parallel(cfg, world)
    resolved = resolve_model(cfg.model)
    # Full tuning trains the weights themselves, so they are fp32 (autocast computes in bf16);
    # a frozen base is stored in the compute dtype.
    model, tokenizer = load_model(resolved, dtype=torch.float32 if cfg.tuning == "full" else precision.weights_dtype,
                                  quantize=cfg.lora.quantize_base)
    quantized = quantize_base(model, cfg.lora.quantize_base, precision.weights_dtype)
    if quantized:
        console.print(f"[bold]quantized base[/]: {quantized.describe()}")
    model.config.use_cache = False  # no KV cache while training: it would only cost memory
    timings["load_model"] = time.perf_counter() - started

    started = time.perf_counter()
    if cfg.objective == "dpo":
        data = prepare_preference_data(cfg.data, tokenizer, val_rows=t.val_rows)
    else:
        data = prepare_data(cfg.data, tokenizer, val_rows=t.val_rows)
    timings["tokenize"] = time.perf_counter() - started
    rep = data.report
    t, choices = auto.resolve(t, len(data.train), rep["tokens_per_example"]["mean"], cfg.tuning, cfg.lora.rank,
                              cfg.lora.use_rslora, model=model, lora=cfg.lora, bf16=precision.bf16,
                              shards=world.size if shard else 1,
                              max_tokens=rep["tokens_per_example"]["max"],
                              max_trained_tokens=rep["trained_tokens_per_example"]["max"])
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

    if cfg.tuning == "full":
        model = unfreeze_all(model)
        method = "full fine-tuning (every weight, fp32 + bf16 autocast)" if precision.bf16 else "full fine-tuning"
    else:
        model = attach_lora(model, cfg.lora)
        if cfg.objective == "dpo":
            model = require_adapter(model)
        method = (
            f"{'DoRA' if cfg.lora.use_dora else 'LoRA'}{' (rsLoRA scaling)' if cfg.lora.use_rslora else ''} "
            f"r={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {cfg.lora.target_modules}"
        )
    kernels = None
    if t.compile_kernels:
        started = time.perf_counter()
        kernels = use_compiled_kernels(model, torch.bfloat16 if precision.bf16 else None)
        timings["compile"] = time.perf_counter() - started
        console.print(f"[bold]kernels[/]: {kernels.describe()}"
                      + ("" if kernels.unavailable else f" (compiled in {timings['compile']:.1f} s)"))
    if model.device.type == "cpu":
        console.print(f"[bold]allocator[/]: {allocator.describe()}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"[bold]model[/]: {cfg.model} + {method} ({trainable / 1e6:.2f}M trainable parameters)"
                  + (f"; DPO beta {cfg.dpo.beta:g}, reference = the base (adapter off)" if cfg.objective == "dpo" else ""))

    # The stream is built for the global micro-batch (all processes), so N processes x batch b
    # see the same examples per step as one process at batch N*b.
    stream = epoch_stream(data.train, t.batch_size * world.size, t.epochs, t.seed)
    steps = math.ceil(len(stream) / t.grad_accumulation)
    warmup = round(t.warmup_ratio * steps)
    # The loss module before the optimizer: FSDP replaces the parameters by their shards.
    loss_module = distributed.wrap(model, world, cfg.dpo.beta if cfg.objective == "dpo" else None, shard=shard)
    if world.active:
        console.print(f"[bold]parallel[/]: {world.size} processes, " + (
            "FSDP: weights, gradients and AdamW state sharded per decoder layer" if shard
            else "DDP: the model replicated, gradients averaged"))
    optimizer, scheduler = make_optimizer(model, t.learning_rate, t.weight_decay, steps, warmup, t.schedule)
    pack = collate_pairs if cfg.objective == "dpo" else collate
    val_batches = [
        pack(data.validation[i : i + t.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(data.validation), t.batch_size)
    ][world.rank :: world.size]
    console.print(
        f"[bold]schedule[/]: {steps} steps x {t.batch_size} examples"
        f"{f' x {world.size} processes' if world.active else ''} x {t.grad_accumulation} accumulation, "
        f"lr {t.learning_rate:g} (warmup {warmup}, {t.schedule}), {t.epochs:g} epoch(s)"
    )
    s = Setup(model, tokenizer, data, precision, resolved, stream, steps, optimizer, scheduler, val_batches,
              cfg, choices, world, timings, loss_module)
    _compile_layers(s, kernels, console)
    if t.packing:
        width = (f"at most {t.pack_length} tokens (or the longest example)" if t.pack_length
                 else "as wide as the micro-batch's longest example")
        summary = pack_summary(stream, t.pack_length, share_prefix=not s.sharded)
        console.print(f"[bold]packing[/]: rows {width}; {summary.describe()}")
    return s


def _why_layers_stay_eager(s: Setup, kernels: CompiledKernels | None) -> str | None:
    """Why `train.compile_layers` leaves the decoder layers eager in this run, or None to compile them."""
    cfg, t = s.cfg, s.cfg.train
    if t.compile_layers is False:
        return "off in the config"
    if kernels is None or kernels.unavailable:
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer body's decoder layers (`model.layers`), or [] for a body without that list."""
    body, _ = body_and_head(model)
    layers = getattr(body, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _compile_layers(s: Setup, kernels: CompiledKernels | None, console: Console) -> None:
    """Compile the whole decoder layers (`compiled_kernels.use_compiled_layers`) when it pays, and pay the compile
    now: one forward and backward of the first micro-batch, whose gradients are then dropped."""
    why = _why_layers_stay_eager(s, kernels)
    if why is not None:
        console.print(f"[bold]layers[/]: eager ({why})")
        return
    layers = decoder_layers(s.model)
    started = time.perf_counter()
    use_compiled_layers(layers)
    s.model.train()  # the mode every step runs in (a graph is specialised to it)
    from tunelab.train.recipe import backward_on  # (sft imports this module)

    try:
        backward_on(s.loss_module, [s.collate(s.stream[0])], s.precision)  # a training step's forward and backward
    except Exception as error:  # noqa: BLE001 - a layer that cannot compile trains eager, and the log says why
        for layer in layers:
            restore_eager(layer)
        console.print(f"[bold]layers[/]: eager (torch.compile failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160] if str(error) else ''})")
        return
    finally:
        s.model.zero_grad(set_to_none=True)
    s.timings["compile_layers"] = time.perf_counter() - started
    console.print(f"[bold]layers[/]: torch.compile fuses each of the {len(layers)} decoder layers "
                  f"({s.tokens_to_train:,} tokens to train; compiled in {s.timings['compile_layers']:.1f} s)")
