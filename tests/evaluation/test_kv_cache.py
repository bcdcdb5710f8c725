"""evaluate.kv_cache: a cache with reserved slots behaves exactly like transformers' DynamicLayer."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer

from tunelab.evaluation.kv_cache import ReservedLayer, reserved_cache
from tunelab.evaluation.prefill import _place


def _kv(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=gen), torch.randn(rows, 2, tokens, 4, generator=gen)


def _reserved(keys: torch.Tensor, values: torch.Tensor, reserve: int) -> ReservedLayer:
    rows, heads, tokens, dim = keys.shape
    buffers = [torch.full((rows, heads, tokens + reserve, dim), float("nan")) for _ in range(2)]  # unwritten slots
    buffers[0][:, :, :tokens], buffers[1][:, :, :tokens] = keys, values
    return ReservedLayer(buffers[0], buffers[1], tokens)


def test_updates_selections_and_growth_match_dynamic_layer():
    prompt = _kv(5, 6, seed=0)
    reference = DynamicLayer()
    reference.update(*prompt)
    layer = _reserved(*prompt, reserve=3)
    steps = [_kv(5, 1, seed=s) for s in range(1, 4)] + [_kv(3, 1, seed=9), _kv(3, 2, seed=10), _kv(3, 1, seed=11)]
    for step, new in enumerate(steps):
        if step == 3:  # two rows finish: both caches drop them
            keep = torch.tensor([0, 2, 4])
            reference.batch_select_indices(keep)
            layer.batch_select_indices(keep)
        expected = reference.update(*new)
        got = layer.update(*new)  # step 4 runs past the 3 reserved slots: the buffer grows
        for a, b in zip(got, expected):
            assert torch.equal(a, b), step
        assert layer.get_seq_length() == reference.get_seq_length()
    assert not layer.keys.isnan().any()  # never exposes an unwritten slot


def test_writes_go_in_place_while_there_is_room():
    layer = _reserved(*_kv(2, 4, seed=0), reserve=2)
    buffer = layer._key_buffer
    layer.update(*_kv(2, 1, seed=1))
    assert layer._key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()


def test_reserved_cache_reports_the_prompt_length():
    config = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=16, vocab_size=32)
    keys, values = _kv(3, 7, seed=0)
    buffers = [(torch.cat([keys, torch.zeros_like(keys)], dim=2), torch.cat([values, torch.zeros_like(values)], dim=2))] * 2
    cache = reserved_cache(config, buffers, filled=7)
    assert cache.get_seq_length() == 7 and all(isinstance(layer, ReservedLayer) for layer in cache.layers)
    assert torch.equal(cache.layers[1].keys, keys)


def test_place_zeroes_the_gap_between_prefix_and_suffix():
    kv = torch.arange(2 * 1 * 5 * 1, dtype=torch.float32).view(2, 1, 5, 1) + 1  # prefix 2 tokens, suffix 3
    dest = torch.full((2, 1, 8, 1), float("nan"))
    _place(dest[:, :, :7], kv, prefix_len=2, gap=2)
    assert torch.equal(dest[:, :, :2], kv[:, :, :2])
    assert torch.equal(dest[:, :, 2:4], torch.zeros(2, 1, 2, 1))  # masked later, but finite
    assert torch.equal(dest[:, :, 4:7], kv[:, :, 2:])
    assert dest[:, :, 7:].isnan().all()  # the reserve is left alone
