"""'auto' hyperparameters: each resolved from the data and said in words.

    epochs         OpenAI-like: start at 3 passes, then scale so that examples x epochs
                   lands in [3,000, 25,000] (few rows -> more passes, many -> fewer).
    batch_size     about 1,024 real tokens per micro-batch, a power of two in [1, 32]: larger
                   matrix products per step run faster per token, up to where memory allows
                   (docs/benchmarks.md has the measurements). Then capped by memory: the batch of the longest rows must fit in 70% of
                   the memory free where the model is (tunelab.training.memory estimates it);
                   if not even one row fits, a TunelabError says what to change. A batch
                   set in the config is kept, with a warning in the run log if it may not fit.
    learning_rate  LoRA / DoRA: 1e-3 at batch 16, scaled with sqrt(batch / 16), at most 2e-3.
                   (On Banking77 both 1e-3 at batch 16 and 2e-3 at batch 32 reach ~86%.)
                   The rank does not enter: with alpha = 2 x rank (our default) the update's
                   scale is alpha / rank = 2 whatever the rank; rsLoRA (alpha / sqrt(rank))
                   grows with the rank, so its rate is divided by sqrt(rank / 16).
                   Full fine-tuning: 5e-5 at batch 16 (a full model moves every weight; the
                   usual 1e-5..1e-4 range), same sqrt scaling, at most 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tunelab.config import LoraConfig, TrainConfig
from tunelab.errors import TunelabError
from tunelab.training.memory import Available, MemoryEstimate, available_memory, estimate_training_memory

EXAMPLE_PASSES = (3_000, 25_000)  # the range examples x epochs is brought into
DEFAULT_EPOCHS = 3
TOKENS_PER_MICRO_BATCH = 1_024
MAX_BATCH = 32
MEMORY_FRACTION = 0.7  # of the free memory a batch may plan on: the estimate is approximate, others run too
SET_IN_CONFIG = "set in the config"
Source = Literal["config", "default", "auto"]


@dataclass(frozen=True)
class Choice:
    value: float
    why: str
    source: Source = "auto"  # set in the config, tunelab's default, or chosen automatically (why says how)


def choose_epochs(rows: int) -> Choice:
    low, high = EXAMPLE_PASSES
    if rows * DEFAULT_EPOCHS < low:
        epochs = min(25, math.ceil(low / rows))
        return Choice(epochs, f"{rows:,} rows x {epochs} epochs >= {low:,} example passes (few rows: more passes)")
    if rows * DEFAULT_EPOCHS > high:
        epochs = max(1, high // rows)
        return Choice(epochs, f"{rows:,} rows x {epochs} epoch(s) <= {high:,} example passes (many rows: fewer passes)")
    return Choice(DEFAULT_EPOCHS, f"{rows:,} rows x {DEFAULT_EPOCHS} epochs is within {low:,}-{high:,} example passes")


def choose_batch_size(mean_tokens: float, memory: MemoryEstimate | None = None,
                      available: Available | None = None) -> Choice:
    """The speed target, then (given an estimate and the free memory) the cap of what fits."""
    fit = max(1, int(TOKENS_PER_MICRO_BATCH // max(mean_tokens, 1)))
    batch = min(MAX_BATCH, 2 ** int(math.log2(fit)))
    why = f"~{TOKENS_PER_MICRO_BATCH:,} tokens per micro-batch at {mean_tokens:.0f} tokens/example -> {batch} " \
          f"(power of two, at most {MAX_BATCH})"
    if memory is None or available is None:
        return Choice(batch, why)
    largest, room = _fits(memory, available)
    if largest < 1:
        raise TunelabError(
            f"not even batch 1 fits in memory: {_describe(memory)} needs {_size(memory.total(1))}, more than "
            f"{MEMORY_FRACTION:.0%} of {room}",
            fix="lower data.max_length (the longest rows set the estimate), set lora.quantize_base: int8 "
                "(or nf4), use tuning: lora instead of full, or a lower lora.rank",
        )
    why += f"; memory: {_describe(memory)} fits {largest:,} in {MEMORY_FRACTION:.0%} of {room}"
    if largest < batch:
        batch = 2 ** int(math.log2(largest))
        why += f" -> {batch}"
    return Choice(batch, why)


def check_batch_size(batch: int, memory: MemoryEstimate, available: Available, source: Source = "config") -> Choice:
    """A batch set in the config is kept; the reason says so, and warns when the estimate says it may not fit."""
    largest, room = _fits(memory, available)
    if batch <= largest:
        return Choice(batch, _given(source), source)
    return Choice(batch, f"{_given(source)}; WARNING: it may not fit in memory: {_describe(memory)} fits "
                         f"{largest:,} in {MEMORY_FRACTION:.0%} of {room}; lower train.batch_size (and raise "
                         "train.grad_accumulation to keep the step's examples) or data.max_length", source)


def _given(source: Source) -> str:
    return SET_IN_CONFIG if source == "config" else "tunelab's default"


def _fits(memory: MemoryEstimate, available: Available) -> tuple[int, str]:
    """The largest batch that fits, and the memory it was fitted into, in words.

    The weights are loaded already, on the device whose free memory `available` is: they count as room.
    """
    room = available.bytes + memory.weights
    largest = memory.largest_batch(MEMORY_FRACTION * room)
    return largest, f"{_size(room)} ({available.source} + the loaded weights)"


def _describe(memory: MemoryEstimate) -> str:
    return f"{_size(memory.fixed)} fixed + {_size(memory.per_example)} per example at {memory.length:,} tokens"


def _size(n: float) -> str:
    """Bytes in words: 1.9 GB, 41 MB, 2.5 MB, 18 kB."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB"


def choose_learning_rate(batch_size: int, tuning: str = "lora", rank: int = 16, rslora: bool = False) -> Choice:
    if tuning == "full":
        lr = min(1e-4, 5e-5 * math.sqrt(batch_size / 16))
        return Choice(lr, f"full fine-tuning: 5e-5 at batch 16, x sqrt({batch_size}/16), at most 1e-4")
    lr = min(2e-3, 1e-3 * math.sqrt(batch_size / 16))
    if rslora:
        lr /= math.sqrt(rank / 16)
        return Choice(lr, f"LoRA: 1e-3 at batch 16, x sqrt({batch_size}/16), at most 2e-3, "
                          f"/ sqrt({rank}/16) for rsLoRA's rank-growing scale")
    return Choice(lr, f"LoRA: 1e-3 at batch 16, x sqrt({batch_size}/16), at most 2e-3 (rank {rank} does not "
                      "change it: alpha/rank sets the scale)")


def resolve(train: TrainConfig, rows: int, mean_tokens: float, tuning: str = "lora", rank: int = 16,
            rslora: bool = False, *, model: torch.nn.Module | None = None, max_tokens: int | None = None,
            max_trained_tokens: int | None = None, lora: LoraConfig | None = None,
            bf16: bool = False, shards: int = 1) -> tuple[TrainConfig, dict[str, Choice]]:
    """A copy of `train` with every 'auto' replaced, and the reason for each value (auto or not).

    With `model` (loaded, before LoRA or unfreezing) and the data's longest row (`max_tokens`, and the most
    trained tokens in a row), the batch is also fitted to memory: see `choose_batch_size`.
    `shards`: processes that shard the weights and training state (FSDP), see memory.estimate_training_memory.
    """
    memory = available = None
    if model is not None and max_tokens is not None:
        memory = estimate_training_memory(model, max_tokens, max_trained_tokens or max_tokens, tuning=tuning,
                                          lora=lora or LoraConfig(rank=rank, use_rslora=rslora), bf16=bf16,
                                          shards=shards)
        available = available_memory(next(model.parameters()).device)
    choices: dict[str, Choice] = {}

    def given(name: str) -> Choice:
        source: Source = "config" if name in train.model_fields_set else "default"
        return Choice(getattr(train, name), _given(source), source)

    epochs = choose_epochs(rows) if train.epochs == "auto" else given("epochs")
    if train.batch_size == "auto":
        batch = choose_batch_size(mean_tokens, memory, available)
    elif memory is not None and available is not None:
        batch = check_batch_size(train.batch_size, memory, available, given("batch_size").source)
    else:
        batch = given("batch_size")
    lr = (choose_learning_rate(int(batch.value), tuning, rank, rslora) if train.learning_rate == "auto"
          else given("learning_rate"))
    if train.learning_rate_multiplier != 1.0:
        m = train.learning_rate_multiplier
        lr = Choice(float(lr.value) * m, f"{lr.why}, x {m:g} (learning_rate_multiplier)", lr.source)
    choices.update(epochs=epochs, batch_size=batch, learning_rate=lr)
    resolved = train.model_copy(update={"epochs": float(epochs.value), "batch_size": int(batch.value),
                                        "learning_rate": float(lr.value)})
    return resolved, choices
