"""tunelab.model.kernels.attention: grouped-query eager attention equals transformers' eager attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.model.kernels import attention


@pytest.fixture(scope="module")
def gqa_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, initializer_range=0.2,  # 3 query heads per KV head
    )
    return LlamaForCausalLM(cfg)


def _logits_and_grad(model: LlamaForCausalLM, impl: str, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_attn_implementation(impl)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


def test_forward_and_backward_equal_eager(gqa_model):
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    mask[2, 8:] = 0  # right padding in another
    ref_logits, ref_grad = _logits_and_grad(gqa_model, "eager", ids, mask)
    logits, grad = _logits_and_grad(gqa_model, attention.NAME, ids, mask)
    real = mask.bool()
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5 * ref_grad.abs().max())


def test_is_really_used(gqa_model, monkeypatch):
    """Guards against a silent fallback: the registered function is what the model calls."""
    from transformers import AttentionInterface

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return attention.grouped_query_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, spy)
    gqa_model.set_attn_implementation(attention.NAME)
    with torch.no_grad():
        gqa_model(input_ids=torch.randint(0, 97, (1, 5)))
    assert len(calls) == gqa_model.config.num_hidden_layers


def test_kv_cache_decoding_equals_full_forward(gqa_model):
    from transformers import DynamicCache

    gqa_model.set_attn_implementation(attention.NAME)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = gqa_model(input_ids=ids).logits[:, -1]
        cache = DynamicCache(config=gqa_model.config)
        gqa_model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        step = gqa_model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_no_grad_path_equals_the_training_path(gqa_model):
    """In generation (no gradients) the attention runs through SDPA (enable_gqa); it must give the same outputs."""
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, 8:] = 0
    gqa_model.set_attn_implementation(attention.NAME)
    with torch.no_grad(), attention.generation_kernels():
        inference = gqa_model(input_ids=ids, attention_mask=mask).logits
    training = gqa_model(input_ids=ids, attention_mask=mask).logits.detach()  # grad enabled: the matmul form
    real = mask.bool()
    assert torch.allclose(inference[real], training[real], atol=1e-5)


@pytest.mark.parametrize("query_len", [1, 5])
def test_attention_behind_a_shared_prefix_equals_attention_over_the_whole(query_len):
    """Split softmax (prefix once for all rows + each row's own keys under its mask) == one softmax over both."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, d, p, own = 3, 6, 2, 16, 7, 9
    query = torch.randn(b, h, query_len, d, generator=g)
    key, value = torch.randn(b, hkv, own, d, generator=g), torch.randn(b, hkv, own, d, generator=g)
    prefix_key, prefix_value = torch.randn(1, hkv, p, d, generator=g), torch.randn(1, hkv, p, d, generator=g)
    keep = torch.ones(b, 1, query_len, own, dtype=torch.bool).tril(own - query_len)  # causal over own keys
    keep[0, :, :, :4] = False  # left padding in one row
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    out = attention._attention_behind_prefix(query, key, value, prefix_key, prefix_value, mask, 0.25)  # (B, T, H, D)

    whole_key = torch.cat([prefix_key.expand(b, -1, -1, -1), key], dim=2).repeat_interleave(h // hkv, dim=1)
    whole_value = torch.cat([prefix_value.expand(b, -1, -1, -1), value], dim=2).repeat_interleave(h // hkv, dim=1)
    whole_mask = torch.cat([torch.zeros(b, 1, query_len, p), mask], dim=-1)
    probs = torch.softmax(query @ whole_key.transpose(2, 3) * 0.25 + whole_mask, dim=-1)
    expected = (probs @ whole_value).transpose(1, 2)  # (B, T, H, D)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cached_decoding_behind_a_shared_prefix_equals_full_forward(gqa_model):
    """The model with the prefix's KV read in place (cache and mask holding only the rest) == the plain forward."""
    from transformers import DynamicCache

    gqa_model.set_attn_implementation(attention.NAME)
    prefix = torch.randint(0, 97, (1, 6))
    rest = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        full = gqa_model(input_ids=torch.cat([prefix.expand(2, -1), rest], dim=1)).logits[:, 6:]  # (2, 5, V)
        prefix_cache = DynamicCache(config=gqa_model.config)
        gqa_model(input_ids=prefix, cache=prefix_cache, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        cache = DynamicCache(config=gqa_model.config)
        positions = torch.arange(6, 11).expand(2, -1)
        with attention.behind_shared_prefix(layers):
            first = gqa_model(input_ids=rest[:, :4], position_ids=positions[:, :4], cache=cache,
                              use_cache=True).logits  # (2, 4, V)
            step = gqa_model(input_ids=rest[:, 4:], position_ids=positions[:, 4:], cache=cache,
                             use_cache=True).logits  # (2, 1, V)
        assert cache.get_seq_length() == 5  # the rows' own tokens only
    torch.testing.assert_close(torch.cat([first, step], dim=1), full, rtol=1e-4, atol=1e-5)


def test_softmax_saving_rounded_has_the_softmax_gradient():
    """In float64 nothing is rounded: the hand-written backward is the softmax's own (gradcheck)."""
    from tunelab.model.kernels.attention import _SoftmaxSavingRounded

    scores = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: _SoftmaxSavingRounded.apply(s, torch.float64), (scores,))


def test_softmax_saving_rounded_in_bf16_keeps_only_the_rounded_probabilities():
    """Same forward as softmax-in-fp32-then-cast, bit for bit; backward within bf16's rounding of the
    eager one; and what it keeps for backward is the bf16 output alone (no fp32 copy)."""
    from tunelab.model.kernels.attention import softmax_saving_rounded

    scores = (torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    grad = torch.randn(4, 3, 48, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    eager_in = scores.clone().requires_grad_()
    eager = torch.softmax(eager_in, dim=-1, dtype=torch.float32).to(torch.bfloat16)
    eager.backward(grad)
    saved: list[torch.Tensor] = []
    ours_in = scores.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = softmax_saving_rounded(ours_in, torch.bfloat16)
    ours.backward(grad)
    assert torch.equal(ours, eager)
    assert [t.dtype for t in saved] == [torch.bfloat16] and saved[0].shape == scores.shape
    reference = scores.float().requires_grad_()
    torch.softmax(reference, dim=-1).backward(grad.float())
    error = (ours_in.grad.float() - reference.grad).norm() / reference.grad.norm()
    eager_error = (eager_in.grad.float() - reference.grad).norm() / reference.grad.norm()
    assert error < 1e-2 and error <= 2 * eager_error + 1e-3, (float(error), float(eager_error))
