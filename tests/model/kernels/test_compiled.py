"""tunelab.model.kernels.compiled: the compiled RMSNorm and gated MLP compute what the eager ones do."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from tunelab.config import LoraConfig
from tunelab.model.kernels import compiled as compiled_kernels
from tunelab.model.kernels.compiled import CompiledGatedMlp, CompiledNorm, restore_eager, use_compiled_kernels
from tunelab.model.load import attach_lora


def _llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2, **overrides})
    return LlamaForCausalLM(config)


def _loss_and_grads(model, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_norm_and_mlp_is_swapped_and_state_dict_keys_stay():
    model = _llama()
    keys = list(model.state_dict())
    kernels = use_compiled_kernels(model, None)
    assert (kernels.norms, kernels.mlps, kernels.unavailable) == (5, 2, None)  # 2 x 2 per layer + final norm
    assert all(isinstance(m, CompiledNorm) for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    assert all(isinstance(layer.mlp, CompiledGatedMlp) and isinstance(layer.mlp, LlamaMLP) for layer in model.model.layers)
    assert list(model.state_dict()) == keys  # adapter and model files are unchanged
    assert all(p.grad is None for p in model.parameters())  # the probe ran on copies
    restore_eager(model)
    assert type(model.model.norm) is LlamaRMSNorm and type(model.model.layers[0].mlp) is LlamaMLP


def test_a_bf16_base_under_fp32_adapters_is_still_a_gated_mlp_and_gets_fused():
    """Training over a bf16 base keeps its LoRA weights fp32 and runs under autocast; the class check must run the
    same way, or it calls the MLP "not gated" and a bf16 run keeps every MLP and layer eager (it did)."""
    model = attach_lora(_llama().to(torch.bfloat16), LoraConfig(rank=4, alpha=8))
    compiled_kernels._gated_classes.clear()  # the class check runs again, as in a fresh process
    assert all(compiled_kernels.is_llama_layer(layer) for layer in model.base_model.model.model.layers)
    kernels = use_compiled_kernels(model, torch.bfloat16)
    assert (kernels.norms, kernels.mlps) == (5, 2)


def test_setup_draws_nothing_from_the_global_rng():
    """The probes run once per process (cached): drawing from torch's RNG would shift a run's random stream by
    what ran before it, and a run resumed in a fresh process would get other dropout masks than uninterrupted."""
    model = _llama()
    compiled_kernels._gated_classes.clear()  # the class check runs again, as in a fresh process
    state = torch.get_rng_state()
    use_compiled_kernels(model, None)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("length", [5, 11])  # two lengths: one compiled graph serves both (dynamic shapes)
def test_fp32_loss_and_gradients_equal_eager(length: int):
    eager = _llama()
    compiled = copy.deepcopy(eager)
    use_compiled_kernels(compiled, None)
    ids = torch.randint(0, 97, (3, length), generator=torch.Generator().manual_seed(length))
    loss_e, grads_e = _loss_and_grads(eager, ids, autocast=False)
    loss_c, grads_c = _loss_and_grads(compiled, ids, autocast=False)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_lora_training_is_as_close_to_fp32_as_eager_is():
    """A bf16 LoRA model (the CPU default) under autocast: the compiled kernels round no worse than eager."""
    fp32 = attach_lora(_llama(), LoraConfig(rank=4, alpha=8, dropout=0.0))
    for p in fp32.parameters():  # LoRA B starts at zero; random B makes every adapter gradient non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    eager = copy.deepcopy(fp32)
    for name, p in eager.named_parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    compiled = copy.deepcopy(eager)
    use_compiled_kernels(compiled, torch.bfloat16)
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(fp32, ids, autocast=False)
    loss_e, grads_e = _loss_and_grads(eager, ids, autocast=True)
    loss_c, grads_c = _loss_and_grads(compiled, ids, autocast=True)
    assert abs(loss_c - loss_ref) <= 2 * abs(loss_e - loss_ref) + 1e-3
    for name in grads_ref:
        err_e = (grads_e[name] - grads_ref[name]).norm() / grads_ref[name].norm()
        err_c = (grads_c[name] - grads_ref[name]).norm() / grads_ref[name].norm()
        assert err_c <= 2 * err_e + 1e-3, (name, float(err_c), float(err_e))
        assert err_c < 0.05, name


class _UpTimesActGate(LlamaMLP):
    """Another MLP: the activation on up, not gate. Its forward must be left alone."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_an_mlp_with_another_forward_keeps_it():
    model = _llama()
    other = _UpTimesActGate(model.config)
    model.model.layers[1].mlp = other
    kernels = use_compiled_kernels(model, None)
    assert kernels.mlps == 1 and type(model.model.layers[1].mlp) is _UpTimesActGate
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(other(x), other.down_proj(other.act_fn(other.up_proj(x)) * other.gate_proj(x)))


def test_when_compile_fails_everything_stays_eager_and_says_why(monkeypatch: pytest.MonkeyPatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(compiled_kernels.torch, "compile", broken_compile)
    monkeypatch.setattr(compiled_kernels, "_compiled_forwards", {})
    monkeypatch.setattr(compiled_kernels, "_compiled_gated", None)
    model = _llama()
    reference = copy.deepcopy(model)
    kernels = use_compiled_kernels(model, None)
    assert kernels.norms == kernels.mlps == 0
    assert "InvalidCxxCompiler" in kernels.unavailable and "eager" in kernels.describe()
    assert not any(isinstance(m, (CompiledNorm, CompiledGatedMlp)) for m in model.modules())
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    for name, p in model.named_parameters():  # the probe ran on copies: no gradient leaked into the model
        assert p.grad is None, name


def test_training_setup_compiles_unless_switched_off(make_config, classification_csv: Path):
    from helpers import run_log
    from tunelab.training.setup import setup

    for enabled in (True, False):
        with run_log() as lines:
            s = setup(make_config(classification_csv, train={"compile_kernels": enabled}))
        swapped = [m for m in s.model.modules() if isinstance(m, (CompiledNorm, CompiledGatedMlp))]
        log = "\n".join(lines)
        if enabled:
            assert len(swapped) == 5 + 2 and "kernels: torch.compile fuses 5 RMSNorm and 2 gated-MLP" in log
        else:
            assert not swapped and "kernels:" not in log


def test_a_forward_without_gradients_rounds_exactly_like_one_with_them():
    """DPO's reference log-probs (no gradients) must equal the policy's at initialisation, bit for bit,
    in bf16 too: the compiled inference graph and the training graph round alike."""
    model = _llama(vocab_size=301).bfloat16()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # something trains: a training graph
    use_compiled_kernels(model, torch.bfloat16)
    for length in (7, 13):
        ids = torch.randint(0, 301, (4, length), generator=torch.Generator().manual_seed(length))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with_grad = model(ids).logits
            with torch.no_grad():
                without = model(ids).logits
        assert with_grad.requires_grad and not without.requires_grad
        assert torch.equal(with_grad, without)


def _saved_bytes_and_grads(fn, x: torch.Tensor, w: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes `fn` keeps from its forward for its backward, and the gradients of x and w."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w).square().sum().backward()
    return total[0], [x.grad, w.grad]


def test_layers_compiled_under_the_activation_budget_keep_less_for_backward():
    """`use_compiled_layers`' budget: the partitioner recomputes elementwise results instead of keeping them,
    with the same gradients; the process-wide setting is left as it was."""
    from tunelab.model.kernels.compiled import _inductor_within_activation_budget

    # Two definitions of one layer-like chain (elementwise, product, elementwise): each compiles on its own.
    def layer_full(x, w):
        h = torch.nn.functional.silu(x) * x.cos()
        return torch.tanh(h @ w) * h.sin()

    def layer_budgeted(x, w):
        h = torch.nn.functional.silu(x) * x.cos()
        return torch.tanh(h @ w) * h.sin()

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 32, generator=gen), torch.randn(32, 32, generator=gen)
    before = torch._functorch.config.activation_memory_budget
    full, full_grads = _saved_bytes_and_grads(torch.compile(layer_full, dynamic=True), x, w)
    budgeted, grads = _saved_bytes_and_grads(torch.compile(layer_budgeted, dynamic=True,
                                                           backend=_inductor_within_activation_budget), x, w)
    _, eager_grads = _saved_bytes_and_grads(layer_full, x, w)
    assert budgeted < full, (budgeted, full)
    for got, expected in zip(grads + full_grads, eager_grads + eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch._functorch.config.activation_memory_budget == before
