"""tunelab.model.kernels.fused_lora: the fused LoRA forward equals PEFT's own, and steps aside where it would not."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from helpers import tunelab_layer_count, with_tunelab_layers
from tunelab.model.kernels import fused_lora
from tunelab.model.kernels.fused_lora import FusedLoraLinear
from tunelab.model.load import load_model, resolve_model
from tunelab.model.quantize import quantize_base


def _peft_lora(tiny_model_dir, dtype: torch.dtype = torch.float32, dropout: float = 0.0, alpha: float = 8,
               **config: object) -> nn.Module:
    model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=dtype)
    peft_config = PeftLoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", **config)
    torch.manual_seed(0)  # the same lora_A on every call
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at 0: give it values so the adapter's whole path counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, autocast: bool = False,
                    seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both sides
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = logits.float().log_softmax(-1)[..., :50].mean()
    loss.backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_fused_calls(monkeypatch, only: type | None = None) -> list[int]:
    """Calls of the fused paths (`_LoraLinear`: base + adapter; `_AddLora`: adapter onto the base's output)."""
    calls = [0]
    for function in (only,) if only else (fused_lora._LoraLinear, fused_lora._AddLora):
        def counting(*args, _apply=function.apply):
            calls[0] += 1
            return _apply(*args)

        monkeypatch.setattr(function, "apply", counting)
    return calls


IDS = torch.randint(0, 200, (3, 14), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("alpha", [8, 6], ids=["scaling-2", "scaling-1.5"])
def test_fused_lora_matches_peft_outputs_and_gradients_in_fp32(tiny_model_dir, monkeypatch, alpha):
    peft_model = _peft_lora(tiny_model_dir, alpha=alpha)
    ours = with_tunelab_layers(peft_model)
    assert tunelab_layer_count(ours) == sum(type(m) is LoraLinear for m in peft_model.modules()) > 0
    calls = _count_fused_calls(monkeypatch, only=fused_lora._LoraLinear)  # plain linear bases: one node each

    peft_logits, peft_grads = _loss_and_grads(peft_model, IDS)
    assert calls[0] == 0
    logits, grads = _loss_and_grads(ours, IDS)
    assert calls[0] == sum(isinstance(m, FusedLoraLinear) for m in ours.modules())  # every layer took the fused path
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == peft_grads.keys() and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model_dir):
    """bf16 base, fp32 adapters, bf16 autocast (how tunelab trains on AMX): both sides round, differently
    (the fused sum rounds once, PEFT's three times), so each is held to the fp32 result, not to the other."""
    reference_logits, reference_grads = _loss_and_grads(_peft_lora(tiny_model_dir), IDS)
    peft_model = _peft_lora(tiny_model_dir, dtype=torch.bfloat16)
    for m in peft_model.modules():
        if isinstance(m, LoraLinear):
            m.cast_input_dtype_enabled = False  # as tunelab.model.load.adapter_inputs_uncast leaves them
    ours = with_tunelab_layers(peft_model)
    peft_logits, peft_grads = _loss_and_grads(peft_model, IDS, autocast=True)
    logits, grads = _loss_and_grads(ours, IDS, autocast=True)

    def error(x: torch.Tensor, reference: torch.Tensor) -> float:
        return float((x - reference).norm() / reference.norm())

    assert error(logits, reference_logits) <= 1.1 * error(peft_logits, reference_logits)
    assert grads.keys() == peft_grads.keys() == reference_grads.keys()
    ours_errors, peft_errors = [], []
    for name in grads:
        assert grads[name].dtype == torch.float32, name  # adapter gradients keep the adapters' dtype
        ours_errors.append(error(grads[name], reference_grads[name]))
        peft_errors.append(error(peft_grads[name], reference_grads[name]))
        assert ours_errors[-1] < 1.5 * peft_errors[-1] + 5e-3, (name, ours_errors[-1], peft_errors[-1])
    assert sum(ours_errors) <= 1.1 * sum(peft_errors)  # no worse overall (here: ~20% better)


def _with_random_lora_b(model: nn.Module) -> nn.Module:
    """lora_B starts at 0: give it values so the adapter's whole path counts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return model


def test_fused_lora_matches_peft_over_an_int8_base(tiny_model_dir, monkeypatch):
    model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32)
    quantize_base(model, "int8", torch.float32)
    peft_model = _with_random_lora_b(get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    ours = with_tunelab_layers(peft_model)
    assert tunelab_layer_count(ours) > 0
    calls = _count_fused_calls(monkeypatch, only=fused_lora._AddLora)  # a quantized base keeps its own forward
    peft_logits, peft_grads = _loss_and_grads(peft_model, IDS)
    logits, grads = _loss_and_grads(ours, IDS)
    assert calls[0] > 0
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="nf4 needs bitsandbytes")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_lora_matches_peft_over_a_4bit_base(tiny_model_dir, monkeypatch, autocast):
    """PEFT's bitsandbytes Linear4bit (QLoRA's base): the adapter added by `_AddLora`, the same numbers."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.quantize import quantization_config

    compute = torch.bfloat16 if autocast else torch.float32
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=compute,  # as tunelab loads a 4-bit base
                                                quantization_config=quantization_config("nf4", compute))
    torch.manual_seed(0)
    peft_model = _with_random_lora_b(get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    ours = with_tunelab_layers(peft_model)
    four_bit = fused_lora._peft_4bit_class()
    assert tunelab_layer_count(ours) == sum(type(m) is four_bit for m in peft_model.modules()) > 0
    calls = _count_fused_calls(monkeypatch, only=fused_lora._AddLora)
    peft_logits, peft_grads = _loss_and_grads(peft_model, IDS, autocast=autocast)
    assert calls[0] == 0
    logits, grads = _loss_and_grads(ours, IDS, autocast=autocast)
    assert calls[0] == sum(isinstance(m, fused_lora.Fused4bitLinear) for m in ours.modules())
    assert grads.keys() == peft_grads.keys()
    if not autocast:
        torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        return
    # bf16: PEFT rounds the adapter's output, its scaling and the sum; `_AddLora` rounds once. So each side is
    # held to the same 4-bit codes computed in fp32, not to the other (as in the bf16 test above).
    import bitsandbytes

    reference = copy.deepcopy(peft_model)
    for module in reference.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.compute_dtype = torch.float32
    for p in reference.parameters():
        if not isinstance(p, bitsandbytes.nn.Params4bit):
            p.data = p.data.float()
    reference_logits, reference_grads = _loss_and_grads(reference, IDS)

    def error(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    assert error(logits, reference_logits) <= 1.1 * error(peft_logits, reference_logits)
    ours_errors = [error(grads[n], reference_grads[n]) for n in grads]
    peft_errors = [error(peft_grads[n], reference_grads[n]) for n in grads]
    assert sum(ours_errors) <= 1.1 * sum(peft_errors)
    assert all(ours < 1.5 * peft + 5e-3 for ours, peft in zip(ours_errors, peft_errors))


def test_fused_lora_over_a_linear_with_bias_matches_peft(monkeypatch):
    """Qwen2's q/k/v have a bias: the one-node path adds it (and the input gradient) as PEFT does, in fp32
    exactly; under bf16 autocast both round, so each is held to the fp32 result."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20, bias=True), nn.Tanh(), nn.Linear(20, 7, bias=True))
    peft_model = get_peft_model(base, PeftLoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    ours = with_tunelab_layers(peft_model)
    assert tunelab_layer_count(ours) == 2
    calls = _count_fused_calls(monkeypatch, only=fused_lora._LoraLinear)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4))

    def run(model: nn.Module, autocast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(xi)
        y.float().square().sum().backward()
        return {"output": y.detach().float(), "input grad": xi.grad.clone()} | {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference, fp32 = run(peft_model, False), run(ours, False)
    assert calls[0] == 2 and fp32.keys() == reference.keys() and len(reference) == 2 + 4
    for name in reference:  # the output, the input gradient (the base's plus the adapter's), 4 adapter gradients
        torch.testing.assert_close(fp32[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)
    peft_bf16, ours_bf16 = run(peft_model, True), run(ours, True)
    for name in reference:
        def error(result: dict[str, torch.Tensor]) -> float:
            return float((result[name] - reference[name]).norm() / reference[name].norm())
        assert error(ours_bf16) <= 1.5 * error(peft_bf16) + 5e-3, (name, error(ours_bf16), error(peft_bf16))


def test_dropout_dora_merged_and_disabled_adapters_take_peft_path(tiny_model_dir, monkeypatch):
    calls = _count_fused_calls(monkeypatch)

    # Dropout while training: PEFT's forward, bitwise (the same masks from the same seed).
    peft_model = _peft_lora(tiny_model_dir, dropout=0.3)
    ours = with_tunelab_layers(peft_model)
    assert torch.equal(_loss_and_grads(ours, IDS)[0], _loss_and_grads(peft_model, IDS)[0])
    assert calls[0] == 0
    ours.eval()  # no dropout at evaluation: the fused path again
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, peft_model.eval()(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    assert calls[0] > 0

    # DoRA layers are LoRA Linears with a variant: they keep their own forward.
    calls[0] = 0
    dora = with_tunelab_layers(_peft_lora(tiny_model_dir, use_dora=True))
    _loss_and_grads(dora, IDS)  # (DoRA's one-node kernel needs its compiled kernels: tests/model/kernels/test_dora.py)
    assert calls[0] == 0

    # Disabled and merged adapters: the base output, as PEFT gives it.
    ours = with_tunelab_layers(peft_model).eval()
    with torch.no_grad(), ours.disable_adapter():
        plain = ours(input_ids=IDS).logits
        assert calls[0] == 0
    with torch.no_grad():
        adapted = ours(input_ids=IDS).logits
        ours.merge_adapter()
        calls[0] = 0
        merged = ours(input_ids=IDS).logits
    assert calls[0] == 0
    assert not torch.allclose(plain, adapted, atol=1e-3)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_fused_lora_saves_the_same_adapter(tiny_model_dir, tmp_path):
    """Only the forward changes: the PEFT adapter files hold the same tensors under the same names."""
    from safetensors.torch import load_file

    peft_model = _peft_lora(tiny_model_dir)
    ours = with_tunelab_layers(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_forward_sees_each_optimizer_update(tiny_model_dir):
    """After a (fused) AdamW step the fused forward uses the new adapter weights, as PEFT's does.

    (The fused optimizer updates in place without bumping tensors' version counters, so
    nothing derived from the weights may be cached across steps by version.)"""
    from tunelab.training.step import make_optimizer

    ours = with_tunelab_layers(_peft_lora(tiny_model_dir))
    optimizer, _ = make_optimizer(ours, 1e-1, 0.0, total_steps=10, warmup_steps=0)
    for _ in range(2):
        _loss_and_grads(ours, IDS)
        optimizer.step()
        reference = copy.deepcopy(ours)
        for m in reference.modules():
            if isinstance(m, FusedLoraLinear):
                m.__class__ = LoraLinear  # PEFT's own forward, same weights
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(input_ids=IDS).logits, reference.eval()(input_ids=IDS).logits,
                                       rtol=1e-5, atol=1e-5)


def test_a_bf16_base_without_autocast_still_refuses_fp32_input():
    """The one-node path never casts the base's weight: what the base layer would refuse, it refuses."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6, bias=False))
    peft_model = get_peft_model(base, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    peft_model.base_model.model[0].base_layer.to(torch.bfloat16)  # the frozen base in bf16, the adapter fp32
    ours = with_tunelab_layers(peft_model)
    assert tunelab_layer_count(ours) == 1
    with pytest.raises(RuntimeError, match="dtype"):
        ours(torch.randn(3, 8))
