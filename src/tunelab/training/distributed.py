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

How the model is spread (`train.parallel`). Adapters use DistributedDataParallel:
every process holds the whole frozen base and the small adapter, and gradients are
averaged. Full fine-tuning uses FSDP (torch's `fully_shard`, "FSDP2"): each decoder
layer's weights, gradients and AdamW moments are split across the processes, and a
layer's full weights exist only while it runs, so a model whose full training state
does not fit one device can still be trained. The embeddings, final norm and (tied)
LM head form the root group, gathered for each step's forward.

Only rank 0 writes files; checkpoints are gathered to full tensors first (every
process takes part), so a checkpoint is the same file whatever the number of
processes or the parallelism. Backend: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import TunelabError


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
    """Leave the process group. Call `unwrap` on every DDP module first (see there)."""
    if world.active and dist.is_initialized():
        gc.collect()  # a DDP wrapper left in a reference cycle is freed now, while the group exists (see unwrap)
        dist.destroy_process_group()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (an FSDP-sharded module is its own); drop the wrapper before `shutdown`.

    Why: DDP's C++ reducer holds a reference to the process group. Freed after the group was destroyed, the
    reducer frees the group itself, from a destructor that keeps the GIL while it joins gloo's threads, and a
    gloo thread that waits for the GIL then never ends: a process that hangs at exit (seen under torchrun,
    one rank in a few dozen runs). Freed while the group still exists, it only drops one reference.
    """
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def local_rows(global_micro_batch: list, world: World) -> list:
    """This process's share of a global micro-batch (contiguous rows; the last share may be shorter)."""
    if not world.active:
        return global_micro_batch
    per = -(-len(global_micro_batch) // world.size)  # ceil
    return global_micro_batch[world.rank * per : (world.rank + 1) * per]


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the backend can send it: NCCL sends only CUDA tensors, gloo CPU ones."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a small CPU tensor over processes (in place) and return it."""
    if world.active:
        sent = _wire(tensor)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM)
        tensor.copy_(sent)
    return tensor


def broadcast_text(text: str | None, world: World) -> str:
    """Rank 0's string on every process (e.g. the run directory it created). Sent as UTF-8 bytes in a tensor,
    not with `broadcast_object_list`, which pickles."""
    if not world.active:
        assert text is not None
        return text
    data = list(text.encode("utf-8")) if world.is_main and text is not None else []
    length = _wire(torch.tensor([len(data)], dtype=torch.int64))
    dist.broadcast(length, src=0)
    payload = _wire(torch.tensor(data, dtype=torch.uint8) if world.is_main
                    else torch.empty(int(length.item()), dtype=torch.uint8))
    dist.broadcast(payload, src=0)
    return bytes(payload.cpu().tolist()).decode("utf-8")


def broadcast_flag(flag: bool | None, world: World) -> bool:
    """Rank 0's yes or no on every process (e.g. a measured choice the others must not make differently)."""
    if not world.active:
        return bool(flag)
    t = _wire(torch.tensor([1 if world.is_main and flag else 0]))
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def any_process(flag: bool, world: World) -> bool:
    """True on every process when it is true on any (e.g. one of them was sent SIGTERM)."""
    if not world.active:
        return flag
    t = _wire(torch.tensor([1 if flag else 0]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(module: nn.Module, world: World, shard: bool = False) -> nn.Module:
    """The loss module (`step.ObjectiveLoss`) as the step calls it: itself in one process; under several,
    DDP-wrapped, or with `shard` fully sharded (FSDP2) per decoder layer of `module.model`. Sharding replaces
    the model's parameters by DTensors in place, so the optimizer must be built after this call.
    """
    if not world.active:
        return module
    if shard:
        return _fully_shard(module, module.model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=None if not torch.cuda.is_available() else [torch.cuda.current_device()])


def _fully_shard(module: nn.Module, model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # transformers names the blocks that must not be split across devices: exactly the units to shard.
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise TunelabError(
            f"cannot shard {type(model).__name__}: it names no decoder-layer class (_no_split_modules)",
            fix="train it with train.parallel: ddp",
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)  # the root: embeddings, final norm, LM head (tied to the embeddings in SmolLM2)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter or optimizer state (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict from its shards (every process calls it; tied weights stay one tensor)."""
    # Tied weights (the embeddings and the LM head) are one Parameter object: gather it once (state_dict()
    # detaches, so its values cannot be compared by identity; the parameters themselves can).
    param_of = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    whole: dict[object, torch.Tensor] = {}
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        key = param_of.get(name, name)
        if key not in whole:  # the same decision on every process, so the collectives line up
            whole[key] = full_tensor(value.detach())
        out[name] = whole[key]
    return out


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every process) split the way `like` is; unchanged when `like` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)


@contextlib.contextmanager
def gathered(loss_module: nn.Module):
    """Within `with`: the root group's weights are whole, so the model can be called outside the loss module.

    Validation calls the model's body and head directly; under FSDP the root's
    embeddings and head are only gathered by the root's own forward, so gather them
    here (the decoder layers gather themselves).
    """
    if not is_sharded(loss_module):
        yield
        return
    loss_module.unshard()
    try:
        yield
    finally:
        loss_module.reshard()


def all_gather_tensor(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped CPU tensor, by rank (e.g. each one's RNG state)."""
    if not world.active:
        return [tensor]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    local = tensor.to(device)
    out = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def sync_gradients(loss_module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Accumulation: only the step's last micro-batch reduces gradients across processes.

    DDP: `no_sync()` for the others. FSDP: gradient sync switched off for them (the
    unsharded gradients accumulate locally) and back on for the last.
    """
    if is_sharded(loss_module):
        loss_module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(loss_module, "no_sync"):
        return contextlib.nullcontext()
    return loss_module.no_sync()
