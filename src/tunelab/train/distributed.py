"""Several processes, one run: torch.distributed data parallelism.

Launch with torchrun (or `tunelab train --nproc N`, which calls it for you):

    torchrun --nproc-per-node 2 -m tunelab train examples/banking77/demo.yaml

How a step is split. `train.batch_size` is the micro-batch of ONE process, so N
processes train on N x batch_size examples per micro-batch. The run's stream of
micro-batches is built for the global size (N x batch_size) exactly as one process
would build it, and process r takes rows [r*b, (r+1)*b) of each; so 2 processes at
batch b see the same examples per step as 1 process at batch 2b.

Why the loss is scaled. Each process divides its loss sum by the trained tokens of
the WHOLE step (summed over processes with all_reduce), and DDP averages gradients
over processes (divides by N); multiplying by N undoes that average, so the
gradient is exactly that of the one big batch.

Adapters (and full fine-tuning of a model that fits) use DistributedDataParallel;
only rank 0 writes files. Backend: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tunelab.data.batches import Batch
from tunelab.train.loop import token_loss_sum


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_from_env() -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE); one process when there is none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def local_rows(global_micro_batch: list, world: World) -> list:
    """This process's share of a global micro-batch (contiguous rows; the last share may be shorter)."""
    if not world.active:
        return global_micro_batch
    per = -(-len(global_micro_batch) // world.size)  # ceil
    return global_micro_batch[world.rank * per : (world.rank + 1) * per]


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a small CPU tensor over processes (in place) and return it."""
    if world.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_text(text: str | None, world: World) -> str:
    """Rank 0's string on every process (e.g. the run directory it created)."""
    if not world.active:
        assert text is not None
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def any_process(flag: bool, world: World) -> bool:
    """True on every process when it is true on any (e.g. one of them was sent SIGTERM)."""
    if not world.active:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class TokenLoss(nn.Module):
    """The model behind DDP: forward(batch) -> (loss sum, statistics to sum over the step).

    DDP hooks gradient averaging into `forward`, so the loss (which runs the body
    and the head separately, see loop.token_loss_sum) must be computed inside one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, _ = token_loss_sum(self.model, batch)
        return loss_sum, {}


class DpoLoss(TokenLoss):
    """The same for DPO: forward(pair batch) -> (loss sum over pairs, reward sums)."""

    def __init__(self, model: nn.Module, beta: float) -> None:
        super().__init__(model)
        self.beta = beta

    def forward(self, pair_batch) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: ANN001 (PairBatch)
        from tunelab.train.dpo import dpo_loss_sum

        loss_sum, stats = dpo_loss_sum(self.model, pair_batch, self.beta)
        return loss_sum, {"reward_margin": stats.margin, "reward_accuracy": stats.correct,
                          "chosen_reward": stats.chosen_reward, "rejected_reward": stats.rejected_reward}


def wrap(model: nn.Module, world: World, dpo_beta: float | None = None) -> nn.Module:
    """A callable loss module (SFT, or DPO when `dpo_beta` is given): DDP-wrapped when several processes train."""
    module = TokenLoss(model) if dpo_beta is None else DpoLoss(model, dpo_beta)
    if not world.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=None if not torch.cuda.is_available() else [torch.cuda.current_device()])


def sync_gradients(loss_module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Accumulation: only the step's last micro-batch all-reduces gradients (DDP's no_sync for the others)."""
    if last or not hasattr(loss_module, "no_sync"):
        return contextlib.nullcontext()
    return loss_module.no_sync()
