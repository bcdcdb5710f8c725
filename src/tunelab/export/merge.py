"""Merge the adapter into the base in fp32 (PEFT's `merge_and_unload(safe_merge=True)`), and save an HF folder.

    merged = merge(src, unmerged)                 # W + s B A (DoRA: PEFT's renormalised W'), fp32
    files = save_hf(merged, tokenizer, folder, dtype=torch.bfloat16)

Why fp32: PEFT merges in the weight's dtype, so a bf16 base rounds the delta to bf16 and then the sum
again (peft #1388: W_load != W + BA after a bf16 merge); in fp32 the merge is exact up to fp32 rounding,
and the dtype the user asks for is applied once, on save (Unsloth does the same). A run over a quantized
base (int8, nf4) learned its adapter over the dequantized weights, so those are what it merges into: the
dequantized matrices replace the base's, then the plain fp32 merge runs. A full fine-tune has nothing to
merge and is exported as it is.

The saved folder holds config.json, the safetensors weights, the run's tokenizer and chat template
(chat_template.jinja) and a generation config whose eos is the end-of-turn token the adapter learned to
stop on, and no adapter_config.json: transformers re-attaches an adapter it finds (peft #1381).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunelab.errors import TunelabError
from tunelab.export.source import ExportSource, load_base
from tunelab.io import write_json_atomic

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PEFT_PREFIX = "base_model.model."


def dequantized_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """Base-model module name -> its quantized weight as fp32 (out, in), for every quantized linear layer."""
    from tunelab.model.quantize import Int8Linear

    out = {}
    for name, module in model.named_modules():
        base_name = name.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
        if isinstance(module, Int8Linear):
            out[base_name] = module.dequantize()
        elif type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state"):
            import bitsandbytes.functional as bnb_f

            out[base_name] = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return out


def merge(src: ExportSource, unmerged: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """The merged fp32 model. `unmerged` is consumed: merged in place, unless its base was quantized."""
    from tunelab.model.load import load_adapter

    if src.full:
        return unmerged
    if src.cfg.lora.quantize_base != "none":
        weights = dequantized_weights(unmerged)
        base = load_base(src)
        modules = dict(base.named_modules())
        with torch.no_grad():
            for name, weight in weights.items():
                modules[name].weight.copy_(weight)
        unmerged = load_adapter(base, src.run.path / "adapter", "reference").eval()
    try:
        merged = unmerged.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # PEFT: "NaNs detected in the merged weights. The adapter ... seems to be broken"
        raise TunelabError(f"the merge produced non-finite weights: {exc}", where=str(src.run.path / "adapter"),
                           fix="the adapter is broken (NaN/inf weights): retrain it, e.g. with a lower learning "
                               "rate") from None
    return merged.eval()


def base_dtype(folder: Path) -> torch.dtype:
    """The dtype the base's config.json names (`dtype`, or the older `torch_dtype`), else float32."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else torch.float32


def save_hf(merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: torch.dtype) -> None:
    """config + safetensors in `dtype`, the run's tokenizer and chat template, the generation config."""
    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    generation = merged.generation_config
    generation.eos_token_id = tokenizer.eos_token_id  # the end-of-turn token the adapter learned to stop on
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Cast a copy of the weights: the model stays fp32 for the checks that compare against it.
    state = {k: v.detach().to(dtype) for k, v in merged.state_dict().items()}
    merged.save_pretrained(folder, state_dict=state, safe_serialization=True)
    # save_pretrained records the in-memory dtype (fp32) in config.json; the weights on disk are `dtype`, and
    # loaders that read `dtype="auto"` (vLLM, TGI) must see that.
    config_file = Path(folder) / "config.json"
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    saved["dtype"] = str(dtype).removeprefix("torch.")
    write_json_atomic(config_file, saved)
    tokenizer.save_pretrained(folder)
    for stray in ("adapter_config.json", "adapter_model.safetensors"):
        (Path(folder) / stray).unlink(missing_ok=True)
