"""tunelab.model.kernels.dora: DoRA's weight norm by the row-norm identity equals PEFT's own layer."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora.dora import DoraLinearLayer
from torch import nn

from helpers import with_tunelab_layers
from tunelab.model.kernels.dora import RowNormDoraLayer
from tunelab.model.load import load_model, resolve_model

IDS = torch.randint(0, 200, (3, 14), generator=torch.Generator().manual_seed(0))


def _randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero lora_B and magnitudes away from the base norms, so every term of the norm counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return model


def _peft_dora(tiny_model_dir, dropout: float = 0.0) -> nn.Module:
    model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32)
    config = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=True)
    return _randomised(get_peft_model(model, config))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both sides
    logits = model(input_ids=ids).logits
    loss = logits.float().log_softmax(-1)[..., :50].mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_row_norm_dora_matches_peft_outputs_and_gradients(tiny_model_dir, dropout):
    ids = torch.randint(0, 200, (3, 14), generator=torch.Generator().manual_seed(0))
    peft_model = _peft_dora(tiny_model_dir, dropout)
    ours = with_tunelab_layers(peft_model)
    assert sum(type(m) is RowNormDoraLayer for m in ours.modules()) == sum(
        type(m) is DoraLinearLayer for m in peft_model.modules()) > 0

    peft_logits, peft_grads = _loss_and_grads(peft_model, ids)
    logits, grads = _loss_and_grads(ours, ids)
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == peft_grads.keys()
    assert any("lora_magnitude_vector" in n for n in grads) and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _layer_with_bias(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(24, 40, bias=True), nn.ReLU(), nn.Linear(40, 8, bias=True))
    return _randomised(get_peft_model(net, PeftLoraConfig(r=4, lora_alpha=16, target_modules=["0", "2"], use_dora=True)))


def test_weight_norm_equals_the_norm_of_the_adapted_weight_with_a_bias():
    """The identity against PEFT's materialised norm ||W + s·BA|| per row, on layers with a bias."""
    model = with_tunelab_layers(_layer_with_bias(0))
    checked = 0
    for module in model.modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            dora = module.lora_magnitude_vector["default"]
            assert isinstance(dora, RowNormDoraLayer)
            base, lora_a, lora_b = module.get_base_layer(), module.lora_A["default"], module.lora_B["default"]
            scaling = module.scaling["default"]
            expected = torch.linalg.norm(base.weight + scaling * lora_b.weight @ lora_a.weight, dim=1)
            got = dora.weight_norm(lora_a, lora_b, scaling, base, torch.float32)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked == 2


def test_bias_layers_give_peft_outputs():
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    peft_model = _layer_with_bias(1)
    ours = with_tunelab_layers(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-6)


def test_training_mode_rereads_a_changed_base():
    """The base's row norms are cached, and forgotten when training (re)starts, like PEFT's own cache."""
    model = with_tunelab_layers(_layer_with_bias(2))
    x = torch.randn(4, 24)
    model.eval()
    with torch.no_grad():
        model(x)
        layer = model.base_model.model[0]
        layer.get_base_layer().weight.mul_(2)
        model.train()
        got = model(x)
        reference = copy.deepcopy(model)
        for module in reference.modules():
            if type(module) is RowNormDoraLayer:
                module.__class__ = DoraLinearLayer  # PEFT's own forward, reading the base afresh
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-6)


def test_state_dict_and_saved_adapter_are_peft_s(tmp_path):
    peft_model = _layer_with_bias(4)
    ours = with_tunelab_layers(peft_model)
    assert ours.state_dict().keys() == peft_model.state_dict().keys()
    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "peft").iterdir())
    from safetensors.torch import load_file

    saved, reference = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)


def test_bf16_norm_stays_close_to_the_fp32_norm(tiny_model_dir):
    """Under bf16 autocast `W Aᵀ` comes out in bf16; the norm still agrees with fp32 to well under bf16's step."""
    model = with_tunelab_layers(_peft_dora(tiny_model_dir))
    for module in model.modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            args = (module.lora_A["default"], module.lora_B["default"], module.scaling["default"], module.get_base_layer())
            exact = module.lora_magnitude_vector["default"].weight_norm(*args, torch.float32)
            module.lora_magnitude_vector["default"]._base_row_sq = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                approx = module.lora_magnitude_vector["default"].weight_norm(*args, torch.bfloat16)
            assert approx.dtype == torch.float32
            torch.testing.assert_close(approx, exact, rtol=2e-3, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="nf4 needs bitsandbytes")
def test_row_norm_dora_over_a_4bit_base_matches_peft(tiny_model_dir):
    """The base layer itself computes W Aᵀ, so a 4-bit base needs no dequantised weight per step."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.quantize import quantization_config

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                quantization_config=quantization_config("nf4", torch.float32))
    peft_model = _randomised(get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  use_dora=True)))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    peft_logits, peft_grads = _loss_and_grads(peft_model, ids)
    ours = with_tunelab_layers(peft_model)  # the same model, with the row-norm forward
    assert sum(type(m) is RowNormDoraLayer for m in ours.modules()) > 0
    logits, grads = _loss_and_grads(ours, ids)
    torch.testing.assert_close(logits, peft_logits, rtol=1e-3, atol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-2, atol=1e-4, msg=name)


def test_scaled_combine_gradients_are_exact():
    """The hand-written backward of `scale·(base + s·lora)` against autograd's numerical gradient."""
    from tunelab.model.kernels.dora import _ScaleAdapted

    gen = torch.Generator().manual_seed(0)
    base, lora = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = torch.rand(5, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, a, g: _ScaleAdapted.apply(b, a, g, 1.7), (base, lora, scale))


def test_bf16_combine_keeps_small_magnitude_changes():
    """A scale of 1 + 1e-4 (below bf16's half step) moves the bf16 output as PEFT's fp32 sum,
    rounded once, does; rounding `base + s·lora` before scaling would round it away."""
    from tunelab.model.kernels.dora import _ScaleAdapted

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 512, generator=gen).to(torch.bfloat16)
    lora = (0.1 * torch.randn(256, 512, generator=gen)).to(torch.bfloat16)
    scale = torch.full((512,), 1 + 1e-4)
    unscaled = _ScaleAdapted.apply(base, lora, torch.ones(512), 2.0)
    scaled = _ScaleAdapted.apply(base, lora, scale, 2.0)
    peft = ((scale - 1) * base.float() + scale * lora.float() * 2.0 + base.float()).to(torch.bfloat16)
    assert scaled.dtype == torch.bfloat16
    moved_by_peft = peft != unscaled
    assert moved_by_peft.float().mean() > 0.01  # the scale does move PEFT's output
    assert (scaled[moved_by_peft] != unscaled[moved_by_peft]).float().mean() > 0.9
    assert (scaled != peft).float().mean() < 0.02


# The fused layer (`_DoraLinear`): what `use_compiled_kernels` switches on for DoRA over a plain linear base.

def _fused_dora(model: nn.Module, kernels=None) -> nn.Module:
    """`model`'s DoRA layers on the fused path; `kernels` the eager ones (the math), unless given."""
    from tunelab.model.kernels.dora import DoraKernels, combine, split_grad

    model = with_tunelab_layers(model)
    for module in model.modules():
        if isinstance(module, RowNormDoraLayer):
            module.kernels = kernels or DoraKernels(combine, split_grad)
    return model


def _count_fused_dora(monkeypatch) -> list[int]:
    from tunelab.model.kernels import dora

    calls = [0]

    def counting(*args, _apply=dora._DoraLinear.apply):
        calls[0] += 1
        return _apply(*args)

    monkeypatch.setattr(dora._DoraLinear, "apply", counting)
    return calls


def test_fused_dora_backward_is_exact():
    """The hand-written backward of the one-node layer against autograd's numerical gradient (float64)."""
    from tunelab.model.kernels.dora import DoraKernels, _DoraLinear, combine, split_grad

    gen = torch.Generator().manual_seed(0)
    kernels = DoraKernels(combine, split_grad)
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(7, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()

    def layer(x, a, b, scale):
        return _DoraLinear.apply(x, w, a.detach(), b, scale, a, 1.7, kernels)

    expected = scale * (x @ w.t() + 1.7 * (x @ a.t()) @ b.t())
    torch.testing.assert_close(layer(x, a, b, scale), expected)
    assert torch.autograd.gradcheck(layer, (x, a, b, scale))


def test_fused_dora_matches_peft_outputs_and_gradients(tiny_model_dir, monkeypatch):
    peft_model = _peft_dora(tiny_model_dir)
    ours = _fused_dora(peft_model)
    calls = _count_fused_dora(monkeypatch)
    peft_logits, peft_grads = _loss_and_grads(peft_model, IDS)
    assert calls[0] == 0
    logits, grads = _loss_and_grads(ours, IDS)
    assert calls[0] == sum(isinstance(m, RowNormDoraLayer) for m in ours.modules()) > 0  # every layer fused
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == peft_grads.keys() and any("lora_magnitude_vector" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_fused_dora_in_bf16_is_as_close_to_fp32_as_peft(tiny_model_dir, monkeypatch):
    """How tunelab trains DoRA on AMX: bf16 base, fp32 adapters, bf16 autocast, the kernels compiled by
    `use_compiled_kernels`. Both sides round (differently), so each is held to the fp32 result."""
    from tunelab.model.kernels.compiled import restore_eager, use_compiled_kernels
    from tunelab.model.kernels.fused_lora import uncast_adapter_inputs

    reference_logits, reference_grads = _loss_and_grads(_peft_dora(tiny_model_dir), IDS)
    peft_model = _peft_dora(tiny_model_dir)
    peft_model.get_base_model().to(torch.bfloat16)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # adapters stay fp32, as attach_lora keeps them
    ours = with_tunelab_layers(peft_model)
    uncast_adapter_inputs(ours)
    kernels = use_compiled_kernels(ours, torch.bfloat16)
    assert kernels.doras == sum(isinstance(m, RowNormDoraLayer) for m in ours.modules()) > 0, kernels.describe()
    calls = _count_fused_dora(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_logits, peft_grads = _loss_and_grads(peft_model, IDS)
        logits, grads = _loss_and_grads(ours, IDS)
    assert calls[0] == kernels.doras

    def error(x: torch.Tensor, reference: torch.Tensor) -> float:
        return float((x.float() - reference).norm() / reference.norm())

    assert error(logits, reference_logits) <= 1.2 * error(peft_logits, reference_logits) + 1e-3
    assert grads.keys() == reference_grads.keys()
    ours_errors = [error(grads[n], reference_grads[n]) for n in grads]
    peft_errors = [error(peft_grads[n], reference_grads[n]) for n in grads]
    assert sum(ours_errors) <= 1.2 * sum(peft_errors) + 1e-3, (ours_errors, peft_errors)

    restore_eager(ours)  # back to the unfused row-norm path, with the same result
    calls[0] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss_and_grads(ours, IDS)
    assert calls[0] == 0


def test_fused_combine_keeps_small_magnitude_changes():
    """`combine` rounds `scale·base + lora` once: a scale of 1 + 1e-4 (below bf16's half step) moves the
    output as PEFT's fp32 sum does, where scaling an already rounded bf16 output would not move it."""
    from tunelab.model.kernels.dora import combine

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 512, generator=gen).to(torch.bfloat16)
    lora = (0.1 * torch.randn(256, 512, generator=gen)).to(torch.bfloat16)
    scale = torch.full((512,), 1 + 1e-4)
    unscaled, scaled = combine(base, lora, torch.ones(512)), combine(base, lora, scale)
    peft = (scale * base.float() + lora.float()).to(torch.bfloat16)
    assert scaled.dtype == torch.bfloat16
    moved = peft != unscaled
    assert moved.float().mean() > 0.01
    assert torch.equal(scaled, peft)


def test_fused_dora_steps_aside_for_dropout_and_a_bias(tiny_model_dir, monkeypatch):
    """Where `_DoraLinear` would not compute what PEFT's layer does, the unfused row-norm path runs."""
    calls = _count_fused_dora(monkeypatch)
    peft_model = _peft_dora(tiny_model_dir, dropout=0.3)
    ours = _fused_dora(peft_model)
    peft_logits, _ = _loss_and_grads(peft_model, IDS)
    logits, _ = _loss_and_grads(ours, IDS)
    assert calls[0] == 0
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)

    model = _layer_with_bias(0)
    expected = model(torch.ones(2, 24))
    assert torch.allclose(_fused_dora(model)(torch.ones(2, 24)), expected, rtol=1e-5, atol=1e-6)
    assert calls[0] == 0



@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="nf4 needs bitsandbytes")
def test_fused_dora_steps_aside_for_a_4bit_base(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.model.quantize import quantization_config

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                quantization_config=quantization_config("nf4", torch.float32))
    nf4 = _randomised(get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          use_dora=True)))
    calls = _count_fused_dora(monkeypatch)
    expected, _ = _loss_and_grads(nf4, IDS)
    logits, _ = _loss_and_grads(_fused_dora(nf4), IDS)
    assert calls[0] == 0
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)
