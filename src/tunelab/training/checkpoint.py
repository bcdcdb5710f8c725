"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG and position.

    runs/NAME/checkpoints/step-0000040/
      trainable.safetensors   every trainable parameter, by name (fp32, bit-exact)
      optimizer.safetensors   AdamW moments and step counts per parameter, and every process's RNG state
      state.json              step, optimizer hyperparameters, scheduler state
      checkpoint.json         written last, inside the folder before it is renamed into place

Under several processes every one of them calls `save_checkpoint`: sharded (FSDP)
weights and moments are gathered to whole tensors and each process's RNG state is
collected, then rank 0 alone writes. So the files do not depend on how the run was
spread, and each process resumes with its own RNG stream (dropout stays exact).

No pickle anywhere. A checkpoint folder is written under a temporary name and renamed
only when whole, so a crash mid-write leaves a `.step-*` folder that resume ignores.

The data order needs no saving: the run's micro-batch stream is a pure function of
the data, the config and the seed (`setup.epoch_stream`), so resuming at step k
rebuilds it and continues with micro-batch k's group.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.io import staged_dir, write_json_atomic
from tunelab.training.distributed import World, all_gather_tensor, full_tensor, shard_like

CHECKPOINTS = "checkpoints"
DONE = "checkpoint.json"
BEST = "best.json"  # {"step", "val_loss"} of the best checkpoint, when validation runs
_NAME = re.compile(r"^step-(\d{7})$")


def save_checkpoint(run_path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, keep: int, world: World = World()) -> Path | None:
    """Write step `step`'s checkpoint (rank 0; the others only take part in gathering). Returns its folder on rank 0."""
    # Collectives first, in the same order on every process.
    trainable = {n: full_tensor(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": full_tensor(value).contiguous()
               for idx, st in state["state"].items() for key, value in st.items()}
    tensors.update(_rng_states(world))
    if not world.is_main:
        return None
    root = run_path / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    with staged_dir(final) as tmp:  # a crash mid-write leaves a `.step-*` folder that resume ignores
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
            "processes": world.size,
        }))
        (tmp / DONE).write_text(json.dumps({"step": step, "format": "tunelab-checkpoint/1"}))
    best = best_checkpoint(run_path)
    for old in complete_checkpoints(run_path)[:-keep]:
        if old != best:  # the best checkpoint outlives pruning
            shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_states(world: World) -> dict[str, torch.Tensor]:
    """Each process's torch RNG (and CUDA RNG): rank 0's as `rng.torch` (the one-process format), rank r's as `rng.torch.r`."""
    states: dict[str, torch.Tensor] = {}
    for kind, get in (("torch", torch.get_rng_state), ("cuda", torch.cuda.get_rng_state)):
        if kind == "cuda" and not torch.cuda.is_available():
            continue
        for rank, value in enumerate(all_gather_tensor(get(), world)):
            states[f"rng.{kind}" if rank == 0 else f"rng.{kind}.{rank}"] = value
    return states


def _restore_rng(tensors: dict[str, torch.Tensor], world: World) -> None:
    """This process's RNG state (rank r's `rng.torch.r`). Resume requires the process count the run trained with
    (sft.require_same_processes); a rank missing from an older checkpoint falls back to rank 0's state."""
    for kind, setter in (("torch", torch.set_rng_state), ("cuda", torch.cuda.set_rng_state)):
        mine = tensors.get(f"rng.{kind}" if world.rank == 0 else f"rng.{kind}.{world.rank}", tensors.get(f"rng.{kind}"))
        if mine is not None and (kind == "torch" or torch.cuda.is_available()):
            setter(mine)


def mark_best(run_path: Path, step: int, val_loss: float) -> None:
    """Record which checkpoint has the lowest validation loss (written atomically)."""
    write_json_atomic(run_path / CHECKPOINTS / BEST, {"step": step, "val_loss": val_loss})


def best_checkpoint(run_path: Path) -> Path | None:
    marker = run_path / CHECKPOINTS / BEST
    if not marker.is_file():
        return None
    return run_path / CHECKPOINTS / f"step-{json.loads(marker.read_text())['step']:07d}"


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the trainable weights of a checkpoint (e.g. the best one, before saving the adapter).

    Every process calls it; a sharded parameter takes its own part of the whole tensor.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path / "trainable.safetensors").items():
            params[name].copy_(shard_like(value, params[name]))


def complete_checkpoints(run_path: Path) -> list[Path]:
    """Whole checkpoints, oldest first; half-written (temporary or without checkpoint.json) are skipped."""
    root = run_path / CHECKPOINTS
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / DONE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, world: World = World()) -> int:
    """Restore everything `save_checkpoint` wrote (every process calls it); returns the step it was taken after."""
    load_weights(path, model)
    saved = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    _restore_rng(tensors, world)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # optimizer state index -> parameter
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        # Moments have the parameter's shape and are split like it; the step count is a scalar.
        value = shard_like(value, params[int(idx)]) if value.shape == params[int(idx)].shape else value
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["step"])
