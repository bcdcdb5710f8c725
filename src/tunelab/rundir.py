"""A run directory that describes itself, and loading it back.

    runs/banking77-20261122-101500/
      adapter/            adapter_config.json + adapter_model.safetensors (PEFT format) + README.md (PEFT's model card)
      model/              instead of adapter/ after full fine-tuning: an HF model folder (config + safetensors)
      tokenizer/          tokenizer.json, tokenizer_config.json, chat_template.jinja
      config.json         the resolved RunConfig (absolute paths, every default filled in)
      data.json           rows per split, data hash, tokens, trained tokens per example
      metrics.jsonl       one JSON object per optimizer step / validation
      checkpoints/        step-NNNNNNN/: weights, optimizer, scheduler, RNG (see resume.py); the last K kept
      eval.json           evaluation summary (fine-tune vs base on the same test rows)
      manifest.json       written last: every file with its size and sha256

Every file is written to a temporary name and renamed, and `manifest.json` comes
last, so a directory without a manifest is an unfinished run and is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.io import file_sha256
from tunelab.model.load import adapter_inputs_uncast, attention_for_device, load_model, resolve_model
from tunelab.model.quantize import quantize_base
from tunelab.model.template_canary import check_recorded_template

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: Path, name: str) -> "RunDir":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():  # two runs in the same second
            suffix += 1
            path = Path(output_dir) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.path / name, obj)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Appending a line is the one non-atomic write: a crash loses at most a partial last line.
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop logged steps past `after_step` (a resumed run redoes them), atomically."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = _parse(line)  # None for a partial last line left by a crash
            final_validation = record is not None and "val_loss" in record and "loss" not in record
            if record is not None and record.get("step", 0) <= after_step and not final_validation:
                kept.append(line)
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def save_adapter(self, model: PeftModel) -> None:
        self._save_dir("adapter", lambda tmp: model.save_pretrained(tmp, safe_serialization=True))

    def save_trained(self, model: PeftModel | PreTrainedModel, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter (PEFT format) after LoRA, or the whole model (an HF folder, `model/`) after full tuning.

        `state_dict`: the whole weights when the model itself holds only shards (FSDP).
        """
        if isinstance(model, PeftModel):
            self.save_adapter(model)
        else:
            self._save_dir("model", lambda tmp: model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True))

    def load_saved_model(self) -> PreTrainedModel:
        """The fully tuned model as saved in `model/` (fp32, like the weights that trained)."""
        model = AutoModelForCausalLM.from_pretrained(self.path / "model", dtype=torch.float32,
                                                     attn_implementation=attention_for_device())
        return model.eval()

    def save_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._save_dir("tokenizer", lambda tmp: tokenizer.save_pretrained(tmp))

    def _save_dir(self, name: str, save) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.path))
        try:
            save(tmp)
            final = self.path / name
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_manifest(self, extra: dict[str, Any]) -> None:
        """Last write of a run: lists every file, so its presence means the run is whole."""
        files = {
            str(p.relative_to(self.path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        self.write_json(MANIFEST, {"format": "tunelab-run/1", "files": files, **extra})


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_run_config_for_resume(run_dir: Path) -> RunConfig:
    """The resolved config of a run that may be unfinished (resume needs no manifest, only a config)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise TunelabError(f"{run_dir} has no config.json", fix="pass a run directory written by `tunelab train`")
    return RunConfig.model_validate_json(path.read_text(encoding="utf-8"))


def read_run_config(run_dir: Path) -> RunConfig:
    if not (run_dir / MANIFEST).is_file():
        raise TunelabError(
            f"{run_dir} is not a finished run (no {MANIFEST})",
            fix="pass a run directory printed by `tunelab train` or `tunelab demo`",
        )
    return RunConfig.model_validate_json((run_dir / "config.json").read_text(encoding="utf-8"))


def load_run(
    run_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[PeftModel | PreTrainedModel, PreTrainedTokenizerBase, RunConfig]:
    """Base model + the run's adapter (or the fully tuned model) + the run's tokenizer.

    The chat template travels with the run: it is loaded from RUN_DIR/tokenizer.
    """
    cfg = read_run_config(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    recorded = json.loads((run_dir / "data.json").read_text(encoding="utf-8")).get("chat_template")
    if recorded:  # the canary: the template renders today exactly as it did in training
        check_recorded_template(recorded, tokenizer, where=str(run_dir / "tokenizer"), run_dir=run_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (run_dir / "model").is_dir():  # full fine-tuning
        model = AutoModelForCausalLM.from_pretrained(
            run_dir / "model", dtype=dtype, attn_implementation=attention_for_device()
        )
    else:
        # The base as it was trained on: the adapter learned over the quantized weights (it also loads over
        # the unquantized base, with outputs off by the quantization error: ~2% of the logits for int8).
        base, _ = load_model(resolve_model(cfg.model), dtype=dtype, quantize=cfg.lora.quantize_base)
        quantize_base(base, cfg.lora.quantize_base, dtype)
        model = adapter_inputs_uncast(PeftModel.from_pretrained(base, run_dir / "adapter"))
    model.eval()
    return model, tokenizer, cfg
