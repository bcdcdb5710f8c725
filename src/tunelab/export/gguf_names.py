"""Hugging Face Llama tensors -> llama.cpp's GGUF names, and the q/k row permutation llama.cpp expects.

    gguf_name("model.layers.3.self_attn.q_proj.weight", n_blocks=30)   # 'blk.3.attn_q.weight'
    permute_qk(w, n_head=9)        # HF rotary layout -> llama.cpp's (q_proj; k_proj with n_head = n_kv_head)
    unpermute_qk(w, n_head=9)      # the inverse (what transformers' GGUF loader applies when it reads one)

The names come from the `gguf` package's own table (`gguf.get_tensor_name_map`). The permutation is
written here because no installed library exports it: it lives in llama.cpp's `convert_hf_to_gguf.py`
(`LlamaModel.permute`, repository only, not on PyPI) and, inverted, as a private method of transformers'
GGUF loader (`LlamaTensorProcessor._reverse_permute_weights`). Why it exists: HF's Llama applies rotary
embeddings to the two halves of each head (`rotate_half`), llama.cpp to interleaved pairs; reordering
the rows of W_q and W_k per head turns one into the other. Only rows move, so a LoRA's B (out, r) takes
the same permutation and A (r, in) none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf

from tunelab.errors import TunelabError

if TYPE_CHECKING:  # torch loads only where tensors are written (the CLI checks its input before importing torch)
    import numpy as np
    import torch

ARCH = "llama"  # the one GGUF architecture tunelab writes (Llama-family bases: SmolLM, Llama, TinyLlama, ...)
Q_SUFFIX, K_SUFFIX = "self_attn.q_proj", "self_attn.k_proj"


def name_map(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def gguf_name(hf_name: str, n_blocks: int, names: gguf.TensorNameMap | None = None) -> str:
    """llama.cpp's name of an HF tensor (`model.norm.weight` -> `output_norm.weight`), or a TunelabError."""
    found = (names or name_map(n_blocks)).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise TunelabError(f"tensor '{hf_name}' has no llama.cpp name for the {ARCH} architecture",
                           fix="export models of the Llama family (their HF names map to llama.cpp's), or "
                               "use --to hf for this model")
    return found


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(out, ...) rows reordered per head from HF's half-split rotary layout to llama.cpp's interleaved one.

    `n_head` is num_attention_heads for q_proj and num_key_value_heads for k_proj. Each head's rows
    (2 halves x head_dim/2) become (head_dim/2 pairs x 2): reshape (n_head, 2, d/2, ...), swap 1 and 2.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (llama.cpp's layout back to HF's)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, n_head: int, n_kv_head: int) -> int | None:
    """The head count whose permutation `hf_name` takes (q: n_head, k: n_kv_head), None for every other tensor."""
    if f"{Q_SUFFIX}." in hf_name or hf_name.endswith(Q_SUFFIX):
        return n_head
    if f"{K_SUFFIX}." in hf_name or hf_name.endswith(K_SUFFIX):
        return n_kv_head
    return None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).contiguous().numpy()
