"""What is exported: a finished run or a registry version, its adapter config, its base, and the models.

    src = resolve_source("banking@production")      # or a run directory
    model, tokenizer = load_unmerged(src)            # fp32, plain PEFT layers, the base as it was trained on
    prompts = verification_prompts(src, tokenizer, 8) # token ids from the run's own test split

The unmerged model is the reference every export is checked against: the base in fp32 (quantized the way
the run trained on it, for a QLoRA-style run) plus the adapter, as PEFT computes it (`kernels: reference`,
so tunelab's fused kernels are not what is being checked). The tokenizer is the run's own, checked by the
template canary against what the run recorded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import DEFAULT_MODEL, RunConfig
from tunelab.errors import TunelabError
from tunelab.export.record import BaseRecord, SourceRecord
from tunelab.registry import Registry
from tunelab.rundir import RunDir, finished

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSource:
    requested: str
    run: RunDir
    registry: str | None  # NAME@VERSION
    cfg: RunConfig
    adapter_config: dict | None  # adapter_config.json; None for a full fine-tune

    @property
    def full(self) -> bool:
        return self.adapter_config is None

    @property
    def name(self) -> str:
        return self.registry or self.run.path.name

    def method(self) -> str:
        if self.full:
            return "full"
        c = self.adapter_config
        kind = "dora" if c.get("use_dora") else "rslora" if c.get("use_rslora") else "lora"
        quantized = self.cfg.lora.quantize_base
        return kind if quantized == "none" else f"{kind}+{quantized}"

    def record(self) -> SourceRecord:
        c = self.adapter_config or {}
        return SourceRecord(run_dir=str(self.run.path), registry=self.registry, requested=self.requested,
                            tuning=self.cfg.tuning, method=self.method(), lora_rank=c.get("r"),
                            lora_alpha=c.get("lora_alpha"))


def resolve_source(requested: str | Path) -> ExportSource:
    """A run directory, or a registry reference (NAME, NAME@3, NAME@production), as a finished run."""
    path = Path(requested)
    registry = None
    if not path.exists() and isinstance(requested, str) and "/" not in requested:
        version = Registry().resolve(requested)
        path, registry = version.path, version.ref
    elif not path.exists():
        raise TunelabError(f"'{requested}' is neither a run directory nor a registry reference",
                           fix="pass a run directory printed by `tunelab train`, or NAME@VERSION / NAME@ALIAS "
                               "(`tunelab models list`)")
    run = finished(path)
    cfg = run.config()
    adapter_file = run.path / "adapter" / "adapter_config.json"
    if (run.path / "model").is_dir():
        adapter_config = None
    elif adapter_file.is_file():
        adapter_config = json.loads(adapter_file.read_text(encoding="utf-8"))
    else:
        raise TunelabError(f"no adapter at {adapter_file} and no model/ folder", where=str(run.path),
                           fix="pass a finished run directory written by `tunelab train`")
    return ExportSource(str(requested), run, registry, cfg, adapter_config)


def base_gguf(src: ExportSource) -> Path | None:
    """The base's own GGUF when it came as one (the bundled SmolLM2, or a .gguf the config names)."""
    from tunelab.model.load import bundled_gguf

    spec = src.cfg.model.name
    if spec == DEFAULT_MODEL:
        return bundled_gguf()
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def base_record(src: ExportSource) -> BaseRecord:
    """The base, checked to be the weights the run was trained on (as `tunelab serve` checks)."""
    from tunelab.model.load import resolve_model, weights_fingerprint

    resolved = resolve_model(src.cfg.model.name)
    weights = weights_fingerprint(resolved)
    trained_on = src.run.data().base_model.weights
    if not src.full and weights != trained_on:
        raise TunelabError(f"the base '{src.cfg.model.name}' has other weights now (fingerprint {weights}) than the "
                           f"run was trained on ({trained_on})", where=str(src.run.path),
                           fix="restore the base the run was trained on (data.json names it), or retrain")
    gguf = base_gguf(src)
    return BaseRecord(spec=src.cfg.model.name, path=str(resolved.path), weights=weights,
                      gguf=str(gguf) if gguf else None)


def load_tokenizer(src: ExportSource) -> PreTrainedTokenizerBase:
    """The run's tokenizer and chat template, checked against what the run recorded when it trained."""
    from transformers import AutoTokenizer

    from tunelab.model.template_canary import check_recorded_template

    tokenizer = AutoTokenizer.from_pretrained(src.run.path / "tokenizer")
    check_recorded_template(src.run.data().chat_template.model_dump(), tokenizer, where=str(src.run.path / "tokenizer"),
                            run_dir=src.run.path)
    return tokenizer


def load_unmerged(src: ExportSource) -> PreTrainedModel | PeftModel:
    """The fine-tune as trained, in fp32 with PEFT's own layers: the reference of every check."""
    import torch

    from tunelab.model.load import load_adapter, load_model, load_weights, resolve_model
    from tunelab.model.quantize import quantize_base

    if src.full:
        return load_weights(src.run.path / "model", torch.float32, "reference").eval()
    quantize = src.cfg.lora.quantize_base
    base, _ = load_model(resolve_model(src.cfg.model.name), dtype=torch.float32, quantize=quantize,
                         kernels="reference")
    quantize_base(base, quantize, torch.float32)
    return load_adapter(base, src.run.path / "adapter", "reference").eval()


def load_base(src: ExportSource) -> PreTrainedModel:
    """The base in fp32, unquantized."""
    import torch

    from tunelab.model.load import load_model, resolve_model

    base, _ = load_model(resolve_model(src.cfg.model.name), dtype=torch.float32, kernels="reference")
    return base.eval()


def verification_prompts(src: ExportSource, tokenizer: PreTrainedTokenizerBase, count: int
                         ) -> tuple[list[torch.Tensor], str]:
    """(prompt token ids, where they came from): the run's own test rows, rendered with the generation prompt.

    When the run's data file is gone (a registry version copied elsewhere), the template canary's
    conversations stand in, and the source says so.
    """
    import torch

    from tunelab.model.template_canary import CANARIES
    from tunelab.training.objectives import objective_for

    conversations: list[list[dict[str, str]]] = []
    source = f"{src.cfg.data.path} (the run's test split, then its training rows)"
    try:
        test_rows, train_rows = objective_for(src.cfg).held_out(src.cfg.data)
        for row in [*test_rows, *train_rows][:count]:
            messages = row.prompt if hasattr(row, "prompt") else row.prompt_messages
            conversations.append([{"role": m.role, "content": m.content} for m in messages])
    except (TunelabError, OSError) as exc:
        log.warning("export: the run's data is not readable (%s); verifying on fixed prompts instead", exc)
        conversations, source = [], "the template canary's conversations (the run's data file is not readable)"
    if not conversations:
        conversations = [list(messages) for _, messages, _ in CANARIES][:count]
        conversations = [c[:-1] if c[-1]["role"] == "assistant" else c for c in conversations]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompts = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
    return prompts, source
