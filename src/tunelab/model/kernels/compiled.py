"""torch.compile for the elementwise chains between the matrix products: RMSNorm and the gated MLP.

Why: on this CPU every eager elementwise op is one more pass over the activations and one
more dispatch. Llama's RMSNorm is eight ops forward (a float copy, square, mean, add, rsqrt,
multiply, cast back, weight) and about a dozen backward; the gated MLP's `act(gate) * up`
is two forward and three backward. Inductor fuses each chain into one loop forward and one
backward. Measured on the 2-core AMX CPU (bf16, 16 x 70 tokens x 576): RMSNorm forward +
backward 3.1 -> 0.75 ms; SmolLM2 LoRA training 818 -> 873 tokens/s (steady state, steps 4-22).

What is compiled, and why only that:
- a `*RMSNorm` module's own `forward`, compiled once per class, so the model family's own
  formula (Llama's, Gemma's 1 + weight, ...) is what runs;
- `act_fn(gate) * up` inside an MLP whose forward is exactly the Llama-family
  `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (checked on its source, so any other
  MLP keeps its own forward);
- DoRA's two elementwise passes (`tunelab.model.kernels.dora.combine` and `split_grad`), which switch its
  layers over a plain linear base to the one-node `_DoraLinear` (eager, they are five to six
  passes with fp32 temporaries; measured in `docs/benchmarks.md`).
The matrix products, LoRA and attention stay eager: oneDNN already runs the products, and
PEFT's per-call Python (active adapters, dtype checks) would break a compiled graph into
pieces, each with its own guards (tried in session 6: +9% for 68 s of compile time).

`dynamic=True`: one compiled graph serves every batch shape, instead of a recompile for each
new sequence length. The probe at setup pays the compile (6-7 s for SmolLM2 here with an
empty cache, ~2 s with Inductor's on-disk cache warm); a forward without gradients
(validation) compiles its own graph once more, a few seconds. Where torch.compile cannot
run (no C++ compiler, an unsupported platform), the probe says so and everything stays eager.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._functorch.config  # AOTAutograd's settings (`LAYER_ACTIVATION_BUDGET`)
from torch import nn

from tunelab.model.kernels import dora
from tunelab.model.kernels.dora import DoraKernels, RowNormDoraLayer

log = logging.getLogger(__name__)

_GATED_MLP_SOURCE = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def _gated(act_fn: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


_compiled_gated: Callable[..., torch.Tensor] | None = None
_compiled_forwards: dict[type, Callable[..., torch.Tensor]] = {}


def _gated_kernel() -> Callable[..., torch.Tensor]:
    global _compiled_gated
    if _compiled_gated is None:
        _compiled_gated = torch.compile(_gated, dynamic=True)
    return _compiled_gated


_compiled_dora: DoraKernels | None = None


def _dora_kernels() -> DoraKernels:
    global _compiled_dora
    if _compiled_dora is None:
        _compiled_dora = DoraKernels(torch.compile(dora.combine, dynamic=True),
                                     torch.compile(dora.split_grad, dynamic=True))
    return _compiled_dora


def _norm_kernel(cls: type) -> Callable[..., torch.Tensor]:
    """The class's own forward, compiled once for every instance (parameters are graph inputs)."""
    if cls not in _compiled_forwards:
        _compiled_forwards[cls] = torch.compile(cls.forward, dynamic=True)
    return _compiled_forwards[cls]


class _Compiled(nn.Module):
    """What `_swap` puts in front of a module's own class; `_eager_class` is that class."""

    _eager_class: type


class CompiledNorm(_Compiled):
    """Mixin put in front of an RMSNorm class: the same forward, compiled."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _norm_kernel(self._eager_class)(self, hidden_states)


class CompiledGatedMlp(_Compiled):
    """Mixin put in front of a Llama-family MLP class: `act_fn(gate) * up` compiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.down_proj(_gated_kernel()(self.act_fn, self.gate_proj(x), self.up_proj(x)))


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_gated_mlp(module: nn.Module) -> bool:
    """A module whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        cls = module._eager_class if isinstance(module, _Compiled) else type(module)  # its own forward, not ours
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return _GATED_MLP_SOURCE in "".join(source.split())


_swapped_classes: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    """Give `module` a class that puts `mixin`'s forward before its own class's (state_dict unchanged)."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _swapped_classes:
        _swapped_classes[key] = type(f"Compiled{cls.__name__}", (mixin, cls), {"_eager_class": cls})
    module.__class__ = _swapped_classes[key]


def restore_eager(model: nn.Module) -> None:
    """Undo `use_compiled_kernels` and `use_compiled_layers`: every module runs its own eager forward again."""
    for module in model.modules():
        if isinstance(module, _Compiled):
            module.__class__ = module._eager_class
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
        if isinstance(module, RowNormDoraLayer):
            module.__dict__.pop("kernels", None)


# Whole decoder layers (`use_compiled_layers`): one graph per layer class, forward and backward, with the
# LoRA products, rotary embedding, attention and residuals in it. Measured on the 2-core AMX CPU (SmolLM2,
# LoRA r16, batch 16 of Banking77, steady state): 867 -> 1,099 tokens/s against the kernels above, for a
# compile of ~34 s with Inductor's cache empty, 14-17 s warm. Why not always: that compile outweighs
# the gain on short runs (`train.setup._why_layers_stay_eager`). At the demo's ~1,100 tokens/s and a 1.2x
# gain, a cold compile is paid back after ~220,000 tokens; 'auto' starts a little above that.
LAYER_COMPILE_TOKENS = 300_000


def is_llama_layer(layer: nn.Module) -> bool:
    """A decoder layer of the Llama family: attention, a gated MLP and RMSNorms (what has been traced here)."""
    mlp = getattr(layer, "mlp", None)
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    return (hasattr(layer, "self_attn") and isinstance(mlp, nn.Module) and is_gated_mlp(mlp)
            and all(isinstance(n, nn.Module) and is_rms_norm(n) for n in norms))


# What each compiled layer may keep for its backward, as a fraction of what it would keep saving everything
# (AOTAutograd's `activation_memory_budget`): below 1, the partitioner recomputes cheap elementwise results
# (norms, the MLP's act(gate)*up) in backward instead of holding them from forward to backward. Measured on the
# 2-core AMX CPU (SmolLM2 LoRA, batch 16, bench/train_throughput.py's rows; tokens/s, then peak RSS):
#     1.0: 1,012 / 1,731 MB   0.8: 1,126-1,233 / 1,554 MB   0.6: 1,144-1,174 / 1,456 MB   0.4: 1,102 / 1,358 MB
# and packed 1.0: 1,055 / 1,721 MB, 0.8: 1,207-1,246 / 1,566 MB, 0.6: 1,196-1,198 / 1,456 MB. Saving less is
# faster here, not slower: fewer activation-sized writes, reads and fresh pages per step. 0.6 keeps most of
# 0.8's speed for another ~110 MB.
LAYER_ACTIVATION_BUDGET = 0.6


def use_compiled_layers(layers: list[nn.Module]) -> None:
    """Compile each decoder layer's whole forward (`nn.Module.compile`: one graph for every layer and shape),
    partitioned for backward under `LAYER_ACTIVATION_BUDGET`.

    Modules inside the layers go back to their eager classes first: the layer's graph fuses them itself.
    """
    for layer in layers:
        restore_eager(layer)
        layer.compile(dynamic=True)
        layer._compiled_call_impl = _within_activation_budget(layer._compiled_call_impl)


def _within_activation_budget(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` with AOTAutograd's activation budget set while it runs, so every (re)compile it triggers sees it;
    the process-wide setting stays as it was for anything else compiled."""
    @functools.wraps(call)
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        with torch._functorch.config.patch(activation_memory_budget=LAYER_ACTIVATION_BUDGET):
            return call(*args, **kwargs)

    return budgeted


@contextlib.contextmanager
def eager_layers(model: nn.Module):
    """Within `with`: compiled layers run eager (a forward without gradients, e.g. validation, would otherwise
    compile a second graph of every layer for a few batches)."""
    held = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for module, _ in held:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, compiled in held:
            module._compiled_call_impl = compiled


@dataclass(frozen=True)
class CompiledKernels:
    norms: int
    mlps: int
    unavailable: str | None = None  # why everything stayed eager
    doras: int = 0

    def describe(self) -> str:
        if self.unavailable:
            return f"eager ({self.unavailable})"
        doras = f" and {self.doras} DoRA layers' scaling" if self.doras else ""
        return f"torch.compile fuses {self.norms} RMSNorm and {self.mlps} gated-MLP activations{doras}"


def use_compiled_kernels(model: nn.Module, autocast_dtype: torch.dtype | None) -> CompiledKernels:
    """Swap in the compiled forwards, in place, after a probe that compile works here.

    The probe runs each kernel forward and backward on a copy of one module per class, with a small
    input (under the run's autocast), so a missing compiler is found now, not mid-step;
    its compile is the one the first step would have paid.
    """
    norms = [m for m in model.modules() if is_rms_norm(m) and not isinstance(m, _Compiled)]
    mlps = [m for m in model.modules() if is_gated_mlp(m) and not isinstance(m, _Compiled)]
    doras = [m for m in model.modules() if isinstance(m, RowNormDoraLayer)]
    if not norms and not mlps and not doras:
        return CompiledKernels(0, 0, "no RMSNorm, gated MLP or DoRA layer in this model")
    try:
        # One module of each class: each norm class compiles its own forward.
        _probe(list({type(m): m for m in norms}.values()), list({type(m): m for m in mlps}.values()), autocast_dtype)
        if doras:
            _probe_dora(doras[0].weight, autocast_dtype)
    except Exception as error:  # noqa: BLE001 - any compile failure means: stay eager, and say why
        reason = f"torch.compile unavailable here: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        log.warning("%s; RMSNorm and MLP activations stay eager", reason)
        return CompiledKernels(0, 0, reason)
    for norm in norms:
        _swap(norm, CompiledNorm)
    for mlp in mlps:
        _swap(mlp, CompiledGatedMlp)
    for layer in doras:
        layer.kernels = _dora_kernels()
    return CompiledKernels(len(norms), len(mlps), doras=len(doras))


def _probe(norms: list[nn.Module], mlps: list[nn.Module], autocast_dtype: torch.dtype | None) -> None:
    for module in norms:
        norm = copy.deepcopy(module)
        _swap(norm, CompiledNorm)  # the class the real modules will have, so the guards match theirs
        x = torch.randn(2, 3, norm.weight.shape[-1], dtype=norm.weight.dtype, device=norm.weight.device,
                        requires_grad=True)  # a norm's input has its weight's dtype (bf16 base; fp32 full tuning)
        _run_probe(lambda: norm(x), autocast_dtype, x.device)
    for mlp in mlps:
        # A floating weight (a 4-bit base stores uint8 codes): gate and up come out of (autocast) linear layers
        weight = next(p for p in mlp.parameters() if p.is_floating_point())
        dtype = autocast_dtype or weight.dtype
        gate, up = (torch.randn(2, 3, 8, dtype=dtype, device=weight.device, requires_grad=True) for _ in range(2))
        act = copy.deepcopy(mlp.act_fn)
        _run_probe(lambda: _gated_kernel()(act, gate, up), autocast_dtype, gate.device)


def _probe_dora(magnitude: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    """Both DoRA kernels once, on tensors shaped like a layer's (rows, out) output, as `_DoraLinear` calls them."""
    kernels = _dora_kernels()
    dtype = autocast_dtype or magnitude.dtype
    base, lora = (torch.randn(3, 8, dtype=dtype, device=magnitude.device) for _ in range(2))
    scale = torch.rand(8, dtype=magnitude.dtype, device=magnitude.device) + 0.5
    with torch.no_grad():  # as inside an autograd.Function
        kernels.split_grad(lora, kernels.combine(base, lora, scale), scale)


def _run_probe(call: Callable[[], Any], autocast_dtype: torch.dtype | None, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = call()
    out.float().sum().backward()
