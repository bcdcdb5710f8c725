"""A LoRA adapter as a GGUF adapter for llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`).

    check_adapter_gguf(adapter_config, where)             # refuses what has no GGUF-adapter form, with the fix
    alpha = gguf_alpha(adapter_config)                    # alpha, or alpha * sqrt(r) for rsLoRA
    write_adapter_gguf(path, peft_model, alpha, "f32")    # <llama.cpp name>.lora_a / .lora_b

The format is llama.cpp's `convert_lora_to_gguf.py` (repository only, not on PyPI): `general.type=adapter`,
`adapter.type=lora`, `adapter.lora.alpha`, and per module `lora_a` = PEFT's A (r, in; ggml ne=[in, r]) and
`lora_b` = PEFT's B (out, r; ne=[r, out]); q/k modules permute B's rows like the weight (gguf_names.py).
llama.cpp scales by alpha / r (`llama_adapter_lora_weight::get_scale`, r read from B), so rsLoRA's
alpha / sqrt(r) is stored as alpha * sqrt(r), as vLLM does (PR #6909).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from tunelab.errors import TunelabError
from tunelab.export.gguf_meta import KV, add_kvs
from tunelab.export.gguf_names import ARCH, gguf_name, name_map, permute_qk, qk_heads, to_numpy

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

ADAPTER_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
NOT_LINEAR = ("embed_tokens", "lm_head", "wte", "word_embeddings")
FIX = "export the merged model instead: --to gguf (or --to ollama)"


def check_adapter_gguf(config: dict, where: str) -> None:
    """Raise TunelabError for an adapter llama.cpp's LoRA loader cannot represent, naming why and the fix."""
    if config.get("peft_type") != "LORA":
        raise TunelabError(f"a {config.get('peft_type')} adapter has no GGUF-adapter form (llama.cpp loads LoRA)",
                           where=where, fix=FIX)
    if config.get("use_dora"):
        raise TunelabError("DoRA has no GGUF-adapter form: its magnitude renormalises each row of W + BA, which "
                           "llama.cpp's W x + s B A x cannot express", where=where, fix=FIX)
    if config.get("modules_to_save"):
        raise TunelabError(f"the adapter replaces whole modules ({', '.join(config['modules_to_save'])}), which a "
                           "GGUF adapter cannot hold (llama.cpp loads only lora_a / lora_b pairs)", where=where, fix=FIX)
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    embedded = [t for t in targets if any(n in t for n in NOT_LINEAR)]
    if embedded:
        raise TunelabError(f"the adapter targets {', '.join(embedded)}: llama.cpp's GGUF adapters hold LoRA on linear "
                           "layers only (its converter refuses embeddings and an LM head tied to them)", where=where,
                           fix=FIX)
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise TunelabError("per-module ranks or alphas (rank_pattern, alpha_pattern): a GGUF adapter has one alpha "
                           "for every module", where=where, fix=FIX)


def gguf_alpha(config: dict) -> float:
    """The `adapter.lora.alpha` that makes llama.cpp's alpha / r equal PEFT's scale."""
    alpha, r = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def lora_pairs(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name (e.g. `model.layers.0.self_attn.q_proj`) -> (A (r, in), B (out, r)) of the active adapter."""
    from peft.tuners.lora import LoraLayer

    pairs = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            pairs[name.removeprefix(prefix)] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


def write_adapter_gguf(path: Path, model: PeftModel, alpha: float, tensor_type: str, name: str) -> dict[str, int]:
    """Every LoRA pair of `model` under llama.cpp's names; returns {GGUF type name: tensors}."""
    config = model.get_base_model().config
    n_blocks, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    names = name_map(n_blocks)
    qtype = ADAPTER_TYPES[tensor_type]
    counts = {qtype.name: 0}
    writer = gguf.GGUFWriter(path, arch=ARCH)
    s = gguf.GGUFValueType.STRING
    add_kvs(writer, [KV(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER, s), KV(gguf.Keys.General.NAME, name, s),
                     KV(gguf.Keys.Adapter.TYPE, "lora", s),
                     KV(gguf.Keys.Adapter.LORA_ALPHA, float(alpha), gguf.GGUFValueType.FLOAT32)])
    for module, (a, b) in lora_pairs(model).items():
        heads = qk_heads(module, n_head, n_kv)
        base = gguf_name(f"{module}.weight", n_blocks, names)
        for suffix, tensor in (("lora_a", a), ("lora_b", permute_qk(b, heads) if heads else b)):
            writer.add_tensor(f"{base}.{suffix}", gguf.quants.quantize(to_numpy(tensor), qtype), raw_dtype=qtype)
            counts[qtype.name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
