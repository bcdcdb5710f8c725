"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG and position.

    runs/NAME/checkpoints/step-0000040/
      trainable.safetensors   every trainable parameter, by name (fp32, bit-exact)
      optimizer.safetensors   AdamW moments and step counts per parameter, and the torch RNG state
      state.json              step, optimizer hyperparameters, scheduler state
      checkpoint.json         written last, inside the folder before it is renamed into place

No pickle anywhere. A checkpoint folder is written under a temporary name and renamed
only when whole, so a crash mid-write leaves a `.step-*` folder that resume ignores.

The data order needs no saving: the run's micro-batch stream is a pure function of
the data, the config and the seed (`sft.epoch_stream`), so resuming at step k
rebuilds it and continues with micro-batch k's group.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
DONE = "checkpoint.json"
BEST = "best.json"  # {"step", "val_loss"} of the best checkpoint, when validation runs
_NAME = re.compile(r"^step-(\d{7})$")


def save_checkpoint(run_path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, keep: int) -> Path:
    root = run_path / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        state = optimizer.state_dict()
        tensors = {f"{idx}.{key}": value.contiguous() for idx, st in state["state"].items() for key, value in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
        }))
        (tmp / DONE).write_text(json.dumps({"step": step, "format": "tunelab-checkpoint/1"}))
        if final.exists():  # a re-run of the same step after resume: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = best_checkpoint(run_path)
    for old in complete_checkpoints(run_path)[:-keep]:
        if old != best:  # the best checkpoint outlives pruning
            shutil.rmtree(old, ignore_errors=True)
    return final


def mark_best(run_path: Path, step: int, val_loss: float) -> None:
    """Record which checkpoint has the lowest validation loss (written atomically)."""
    tmp = run_path / CHECKPOINTS / ".best.json.tmp"
    tmp.write_text(json.dumps({"step": step, "val_loss": val_loss}))
    tmp.replace(run_path / CHECKPOINTS / BEST)


def best_checkpoint(run_path: Path) -> Path | None:
    marker = run_path / CHECKPOINTS / BEST
    if not marker.is_file():
        return None
    return run_path / CHECKPOINTS / f"step-{json.loads(marker.read_text())['step']:07d}"


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the trainable weights of a checkpoint (e.g. the best one, before saving the adapter)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path / "trainable.safetensors").items():
            params[name].copy_(value)


def complete_checkpoints(run_path: Path) -> list[Path]:
    """Whole checkpoints, oldest first; half-written (temporary or without checkpoint.json) are skipped."""
    root = run_path / CHECKPOINTS
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / DONE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step it was taken after."""
    load_weights(path, model)
    saved = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["step"])
