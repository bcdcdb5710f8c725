"""'auto' hyperparameters: each resolved from the data and said in words.

    epochs         OpenAI-like: start at 3 passes, then scale so that examples x epochs
                   lands in [3,000, 25,000] (few rows -> more passes, many -> fewer).
    batch_size     about 1,024 real tokens per micro-batch, a power of two in [1, 32]:
                   on this project's 2-core AMX CPU, batch 32 of 36-token rows trained at
                   767 tokens/s against 628 at batch 16 (larger matmuls, same memory class).
    learning_rate  LoRA / DoRA: 1e-3 at batch 16, scaled with sqrt(batch / 16), at most 2e-3.
                   Measured on Banking77: 1e-3 at batch 16 -> 86.8%, 2e-3 at batch 32 -> 86.2%.
                   The rank does not enter: with alpha = 2 x rank (our default) the update's
                   scale is alpha / rank = 2 whatever the rank; rsLoRA (alpha / sqrt(rank))
                   grows with the rank, so its rate is divided by sqrt(rank / 16).
                   Full fine-tuning: 5e-5 at batch 16 (a full model moves every weight; the
                   usual 1e-5..1e-4 range), same sqrt scaling, at most 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.config import TrainConfig

EXAMPLE_PASSES = (3_000, 25_000)  # the range examples x epochs is brought into
DEFAULT_EPOCHS = 3
TOKENS_PER_MICRO_BATCH = 1_024
MAX_BATCH = 32


@dataclass(frozen=True)
class Choice:
    value: float
    why: str


def choose_epochs(rows: int) -> Choice:
    low, high = EXAMPLE_PASSES
    if rows * DEFAULT_EPOCHS < low:
        epochs = min(25, math.ceil(low / rows))
        return Choice(epochs, f"{rows:,} rows x {epochs} epochs >= {low:,} example passes (few rows: more passes)")
    if rows * DEFAULT_EPOCHS > high:
        epochs = max(1, high // rows)
        return Choice(epochs, f"{rows:,} rows x {epochs} epoch(s) <= {high:,} example passes (many rows: fewer passes)")
    return Choice(DEFAULT_EPOCHS, f"{rows:,} rows x {DEFAULT_EPOCHS} epochs is within {low:,}-{high:,} example passes")


def choose_batch_size(mean_tokens: float) -> Choice:
    fit = max(1, int(TOKENS_PER_MICRO_BATCH // max(mean_tokens, 1)))
    batch = min(MAX_BATCH, 2 ** int(math.log2(fit)))
    return Choice(batch, f"~{TOKENS_PER_MICRO_BATCH:,} tokens per micro-batch at {mean_tokens:.0f} tokens/example "
                         f"(power of two, at most {MAX_BATCH})")


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
            rslora: bool = False) -> tuple[TrainConfig, dict[str, Choice]]:
    """A copy of `train` with every 'auto' replaced, and the reason for each value (auto or not)."""
    choices: dict[str, Choice] = {}
    epochs = choose_epochs(rows) if train.epochs == "auto" else Choice(train.epochs, "set in the config")
    batch = choose_batch_size(mean_tokens) if train.batch_size == "auto" else Choice(train.batch_size, "set in the config")
    lr = (choose_learning_rate(int(batch.value), tuning, rank, rslora) if train.learning_rate == "auto"
          else Choice(train.learning_rate, "set in the config"))
    choices.update(epochs=epochs, batch_size=batch, learning_rate=lr)
    resolved = train.model_copy(update={"epochs": float(epochs.value), "batch_size": int(batch.value),
                                        "learning_rate": float(lr.value)})
    return resolved, choices
