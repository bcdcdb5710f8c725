"""One optimizer step's arithmetic: the loss module, gradient accumulation over micro-batches, AdamW.

    loss_module = ObjectiveLoss(model, objective)           # what DDP / FSDP wrap (distributed.wrap)
    loss, units, stats = backward_on(loss_module, batches, precision, world)
    optimizer.step(); scheduler.step()

Shared by the recipe, the setup's compile warm-up and the plan's timed probe steps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from tunelab.model.precision import Precision
from tunelab.training import distributed
from tunelab.training.distributed import World
from tunelab.training.objectives import Objective


class ObjectiveLoss(nn.Module):
    """The model behind DDP: forward(batch) -> (loss sum, statistics to sum over the step).

    DDP hooks gradient averaging into `forward`, so the loss (which runs the body and the head
    separately, see model/scoring.py) must be computed inside one forward.
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: object) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.model, batch)


def backward_on(
    loss_module: nn.Module, micro_batches: list, precision: Precision, world: World = World(),
    weights: list[float] | None = None,
) -> tuple[float, int, dict[str, float]]:
    """Accumulate gradients of one optimizer step.

    Returns the step's mean loss, its loss units (trained tokens; DPO: pairs) over all
    processes, and the step's other statistics as means per unit (DPO: reward margin, ...).

    Each micro-batch's loss *sum* is divided by the units of the whole step (all
    processes), so the gradient equals that of one big batch: accumulation and data
    parallelism are both exact. `loss_module` is `distributed.wrap(ObjectiveLoss(...))`.
    `weights` (0 or 1 per micro-batch) lets a process with no rows of its own join the
    gradient all-reduce without adding anything.
    """
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


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
    schedule: str = "cosine",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable parameters (fp32) with linear warmup, then cosine or linear decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "trainable parameters must be fp32"
    # fused: one kernel over every parameter instead of ~6 per parameter, the same update within 1 ulp.
    # FSDP's shards are DTensors, which the fused kernel does not take: they keep the default implementation.
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused or None)
    decay = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[schedule]
    return optimizer, decay(optimizer, warmup_steps, total_steps)
