"""A merged Llama model as one GGUF file for llama.cpp and Ollama, written with the `gguf` package.

    types = write_model_gguf(path, model, kvs, quant="q8_0")     # {"Q8_0": 211, "F32": 61}

Tensors get llama.cpp's names and the q/k permutation (gguf_names.py). Types follow llama.cpp's converter
(`convert_hf_to_gguf.py`, `prepare_tensors`): 1-D tensors and norms stay F32, every matrix takes the asked
type, and a matrix whose rows do not split into the type's blocks (32 values for Q8_0) falls back to F16,
as the converter does on `QuantError`. With a 4-bit type the token embeddings stay Q8_0: llama-quantize
also keeps them above 4 bits, and rounding them to 4 would degrade every token. A tied LM head is not
written: llama.cpp reuses `token_embd` when `output.weight` is absent.
The file is written under a temporary name and renamed, so a reader never sees half a GGUF.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

from tunelab.export.gguf_meta import KV, add_kvs
from tunelab.export.gguf_names import ARCH, gguf_name, name_map, permute_qk, qk_heads, to_numpy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
FOUR_BIT = ("q4_0", "q4_1")


def hf_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's own tensors by HF name, without the LM head when it is tied to the embeddings."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def tensor_type(gguf_tensor: str, array: np.ndarray, quant: str) -> gguf.GGMLQuantizationType:
    if array.ndim <= 1 or gguf_tensor.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if quant in FOUR_BIT and gguf_tensor.startswith("token_embd."):
        return gguf.GGMLQuantizationType.Q8_0
    return QTYPES[quant]


def encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data to write, its type): quantized by gguf.quants, or F16 where the rows do not fit the type's blocks."""
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_model_gguf(path: Path, model: PreTrainedModel, kvs: list[KV], quant: str) -> dict[str, int]:
    """Write `model` (fp32, merged) with metadata `kvs` to `path`; returns {GGUF type name: tensors}.
    `path` is inside the export's staging folder (export/run.py), which is moved into place only whole."""
    config = model.config
    n_blocks, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    names = name_map(n_blocks)
    counts: Counter[str] = Counter()
    writer = gguf.GGUFWriter(path, arch=ARCH)
    add_kvs(writer, kvs)
    for hf_name, tensor in hf_tensors(model).items():
        heads = qk_heads(hf_name, n_head, n_kv)
        weight = permute_qk(tensor, heads) if heads else tensor
        name = gguf_name(hf_name, n_blocks, names)
        array = to_numpy(weight)
        data, qtype = encode(array, tensor_type(name, array, quant))
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(counts)
