"""llama.cpp's tensor names and the q/k permutation, against transformers' own inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.export.gguf_names import gguf_name, permute_qk, qk_heads, unpermute_qk


@pytest.mark.parametrize("hf, expected", [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"),
    ("model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"),
    ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
])
def test_hf_names_map_to_llama_cpp_names(hf, expected):
    assert gguf_name(hf, n_blocks=4) == expected


def test_an_unknown_tensor_is_refused():
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="no llama.cpp name"):
        gguf_name("model.vision_tower.weight", n_blocks=4)


@pytest.mark.parametrize("heads", [1, 2, 3, 9])
def test_permute_is_undone_by_transformers_gguf_loader(heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(heads * 8, 5)
    permuted = permute_qk(w, heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, heads), w)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), heads, heads)
    assert np.array_equal(theirs, w.numpy())


def test_permute_matches_llama_cpp_converter_on_a_small_case():
    # One head of dim 4: HF rows [r0 r1 | r2 r3] (two halves) -> llama.cpp interleaves them: r0 r2 r1 r3.
    w = torch.arange(4.0)[:, None]
    assert permute_qk(w, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_only_q_and_k_are_permuted():
    assert qk_heads("model.layers.0.self_attn.q_proj", 9, 3) == 9
    assert qk_heads("model.layers.0.self_attn.k_proj.weight", 9, 3) == 3
    assert qk_heads("model.layers.0.self_attn.v_proj.weight", 9, 3) is None
