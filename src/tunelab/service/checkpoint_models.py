"""A job's checkpoint as a model: `{fine_tuned_model}:ckpt-step-{N}` served like the final one.

A checkpoint holds the trainable tensors under the names the model had in training
(`...q_proj.lora_A.default.weight`, training/checkpoint.py); an adapter folder names them as PEFT saves
them (`...q_proj.lora_A.weight`). The first request for a checkpoint writes, beside the job's run, a run
directory of its own for it: the run's adapter_config.json, tokenizer, config.json and data.json, the
checkpoint's tensors renamed, and a manifest written last, so the server checks and serves it exactly as it
serves the final model (the same canary, the same fingerprint check). It is made once, under a temporary
name and renamed whole.

Only a finished run's checkpoints can be served (its adapter_config.json and tokenizer are written at the
end), and only those still on disk (a run keeps its newest `train.keep_checkpoints` and the best).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from tunelab.io import staged_dir
from tunelab.rundir import RunDir

CHECKPOINT_NAME = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>\d+)")
ADAPTER_NAME = "default"  # PEFT's adapter name in training: dropped from the saved tensor names
COPIED = ("config.json", "data.json")


def split_checkpoint_name(name: str) -> tuple[str, int] | None:
    """("ft:...", N) for `ft:...:ckpt-step-N`; None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return (match["model"], int(match["step"])) if match else None


def checkpoint_run(run_dir: Path, step: int) -> Path | None:
    """The run directory serving checkpoint `step` of the finished run at `run_dir` (made on first use), or None
    when that checkpoint is not on disk."""
    source = run_dir / "checkpoints" / f"step-{step:07d}"
    if not (source / "checkpoint.json").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        return None
    target = run_dir.parent / f".{run_dir.name}.ckpt-step-{step}"  # hidden: not a run the worker looks for
    if (target / "manifest.json").is_file():
        return target
    with staged_dir(target) as tmp:
        shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
        for name in COPIED:
            shutil.copy2(run_dir / name, tmp / name)
        (tmp / "adapter").mkdir()
        shutil.copy2(run_dir / "adapter" / "adapter_config.json", tmp / "adapter" / "adapter_config.json")
        tensors = {peft_name(k): v for k, v in load_file(source / "trainable.safetensors").items()}
        save_file(tensors, tmp / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
        RunDir(tmp).write_manifest()
    return target


def peft_name(training_name: str) -> str:
    """`base_model.model.x.lora_A.default.weight` -> `base_model.model.x.lora_A.weight`, as save_pretrained names it."""
    return training_name.replace(f".{ADAPTER_NAME}.", ".")
