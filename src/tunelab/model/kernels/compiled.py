"""torch.compile for the elementwise chains between the matrix products, and for whole decoder layers.

Why: every eager elementwise op is one more pass over the activations and one more dispatch.
Llama's RMSNorm is eight ops forward (a float copy, square, mean, add, rsqrt, multiply, cast
back, weight) and about a dozen backward; the gated MLP's `act(gate) * up` is two forward and
three backward. Inductor fuses each chain into one loop forward and one backward (measured per
CPU class in docs/benchmarks.md).

What is compiled (`use_compiled_kernels`), and why only that:
- a `*RMSNorm` module's own `forward`, compiled once per class, so the model family's own
  formula (Llama's, Gemma's 1 + weight, ...) is what runs;
- `act_fn(gate) * up` inside an MLP whose forward computes `down_proj(act_fn(gate_proj(x)) *
  up_proj(x))`, checked by running it (`is_gated_mlp`), so any other MLP keeps its own forward;
- DoRA's two elementwise passes (`dora.combine` and `split_grad`), which switch its layers over a
  plain linear base to the one-node `_DoraLinear`.
The matrix products, LoRA and attention stay eager: oneDNN already runs the products, and PEFT's
per-call Python (active adapters, dtype checks) breaks a compiled graph into pieces, each with its
own guards. The norm and MLP get their compiled forward by a class swap (`kernels.swap_class`, which
says why); `restore_eager` undoes it.

Whole decoder layers (`use_compiled_layers`, `train.compile_layers`) are one graph each, LoRA
included: faster per step, for a compile of tens of seconds that only long runs pay back.

`dynamic=True`: one compiled graph serves every batch shape, instead of a recompile for each new
sequence length. A probe at setup pays the compile; where torch.compile cannot run (no C++
compiler, an unsupported platform), the probe says so and everything stays eager.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._functorch.config  # AOTAutograd's settings (`LAYER_ACTIVATION_BUDGET`)
from torch import nn

from tunelab.model.kernels import dora, swap_class
from tunelab.model.kernels.dora import DoraKernels, RowNormDoraLayer

log = logging.getLogger(__name__)


def _gated(act_fn: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


_compiled_gated: Callable[..., torch.Tensor] | None = None
_compiled_forwards: dict[type, Callable[..., torch.Tensor]] = {}


# Graphs per compiled kernel: dynamo keys each on grad mode, autocast and dtype (2 x 2 x 2 with dynamic shapes), and
# past torch's default of 8 it silently runs the kernel eager, which rounds unlike the compiled training graph
# (a DPO reference would then differ from its policy at initialisation). A process that trains and evaluates more
# than one run (a notebook, the test suite) reaches 8; this leaves room for that.
RECOMPILE_LIMIT = 32


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=True)


def _gated_kernel() -> Callable[..., torch.Tensor]:
    global _compiled_gated
    if _compiled_gated is None:
        _compiled_gated = _compile(_gated)
    return _compiled_gated


_compiled_dora: DoraKernels | None = None


def _dora_kernels() -> DoraKernels:
    global _compiled_dora
    if _compiled_dora is None:
        _compiled_dora = DoraKernels(_compile(dora.combine), _compile(dora.split_grad))
    return _compiled_dora


def _norm_kernel(cls: type) -> Callable[..., torch.Tensor]:
    """The class's own forward, compiled once for every instance (parameters are graph inputs)."""
    if cls not in _compiled_forwards:
        _compiled_forwards[cls] = _compile(cls.forward)
    return _compiled_forwards[cls]


class _Compiled(nn.Module):
    """What `_compile_forward` puts in front of a module's own class; `_eager_class` is that class."""

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


_gated_classes: dict[type, bool] = {}  # MLP class -> whether its forward is the gated formula (checked once)


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether the module's own forward computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.

    Checked by running it: one small input through the class's forward and through the formula, in
    eval mode (no dropout), bitwise equal (the same ops in the same order). Once per class. This finds
    the Llama family (Llama, Mistral, Qwen2, Gemma, ...) however their code is written, and nothing else.
    """
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Module) for p in parts) or not callable(getattr(module, "act_fn", None)):
        return False
    cls = module._eager_class if isinstance(module, _Compiled) else type(module)  # its own forward, not ours
    if cls not in _gated_classes:
        _gated_classes[cls] = _computes_gated(module, cls)
    return _gated_classes[cls]


def _probe_input(*shape: int, dtype: torch.dtype, device: torch.device, requires_grad: bool = False) -> torch.Tensor:
    """Random values from a private generator: a probe must not draw from torch's global RNG.

    Why: the probes run once per process (their results are cached), so a draw from the global RNG would
    move a run's random stream depending on what ran before in the process; a run resumed in a fresh
    process would then draw other dropout masks than the same run uninterrupted.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(*shape, dtype=dtype, device=device, generator=generator, requires_grad=requires_grad)


@torch.no_grad()
def _computes_gated(module: nn.Module, cls: type) -> bool:
    gate = module.gate_proj
    width = getattr(gate, "in_features", None)
    floating = [p for p in module.parameters() if p.is_floating_point()]
    if not isinstance(width, int) or not floating:
        return False
    # A bf16 base under fp32 adapters runs under autocast in training; outside it their products refuse the mix
    # of dtypes, and the check would call every such MLP "not gated" (which kept a bf16 run's MLPs eager).
    low = min((p.dtype for p in floating), key=lambda dtype: torch.finfo(dtype).bits)
    mixed = low in (torch.bfloat16, torch.float16) and any(p.dtype != low for p in floating)
    x = _probe_input(1, 2, width, dtype=low, device=floating[0].device)
    was_training = module.training
    module.eval()
    try:
        with torch.autocast(x.device.type, dtype=low, enabled=mixed):
            ours = module.down_proj(module.act_fn(gate(x)) * module.up_proj(x))
            theirs = cls.forward(module, x)
    except Exception:  # noqa: BLE001 - a forward that does not take one hidden-state tensor: not this MLP
        return False
    finally:
        module.train(was_training)
    return isinstance(theirs, torch.Tensor) and torch.equal(ours, theirs)


_compiled_classes: dict[tuple[type, type], type] = {}


def _compile_forward(module: nn.Module, mixin: type) -> None:
    """Give `module` a class that puts `mixin`'s forward before its own class's (state_dict unchanged)."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _compiled_classes:
        _compiled_classes[key] = type(f"Compiled{cls.__name__}", (mixin, cls), {"_eager_class": cls})
    swap_class(module, _compiled_classes[key])


def restore_eager(model: nn.Module) -> None:
    """Undo `use_compiled_kernels` and `use_compiled_layers`: every module runs its own eager forward again."""
    for module in model.modules():
        if isinstance(module, _Compiled):
            swap_class(module, module._eager_class)
        _set_compiled_call(module, None)
        if isinstance(module, RowNormDoraLayer):
            module.__dict__.pop("kernels", None)


def _set_compiled_call(module: nn.Module, call: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Set what `nn.Module.compile` installed (None: the module's own eager call); returns what was there.

    Workaround: torch has no public way to undo `nn.Module.compile` or to run one compiled module eagerly
    (`torch.compiler.set_stance` switches every compiled function at once), so this sets the attribute
    `compile` itself sets.
    """
    previous = getattr(module, "_compiled_call_impl", None)
    if previous is not None or call is not None:
        module._compiled_call_impl = call
    return previous


# Whole decoder layers pay their compile back after about this many trained tokens (`train.compile_layers:
# auto`): a cold compile of ~35 s against ~1.2x the speed of the kernels above (2-core AMX VM, SmolLM2 LoRA;
# docs/benchmarks.md has the measurements).
LAYER_COMPILE_TOKENS = 300_000


def is_llama_layer(layer: nn.Module) -> bool:
    """A decoder layer of the Llama family: attention, a gated MLP and RMSNorms (what has been traced here)."""
    mlp = getattr(layer, "mlp", None)
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    return (hasattr(layer, "self_attn") and isinstance(mlp, nn.Module) and is_gated_mlp(mlp)
            and all(isinstance(n, nn.Module) and is_rms_norm(n) for n in norms))


# What each compiled layer may keep for its backward, as a fraction of what it would keep saving everything
# (AOTAutograd's `activation_memory_budget`): below 1, the partitioner recomputes cheap elementwise results
# (norms, the MLP's act(gate)*up) in backward instead of holding them from forward to backward. Saving less
# was also faster (fewer activation-sized writes and fresh pages per step); 0.6 kept most of the speed of
# 0.8 for ~110 MB less (2-core AMX VM; the sweep is in docs/benchmarks.md).
LAYER_ACTIVATION_BUDGET = 0.6


def use_compiled_layers(layers: list[nn.Module]) -> None:
    """Compile each decoder layer's whole forward (`nn.Module.compile`: one graph for every layer and shape),
    partitioned for backward under `LAYER_ACTIVATION_BUDGET`.

    Modules inside the layers go back to their eager classes first: the layer's graph fuses them itself.
    """
    for layer in layers:
        restore_eager(layer)
        layer.compile(dynamic=True, backend=_inductor_within_activation_budget)


def _inductor_within_activation_budget(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor, with AOTAutograd's activation budget set while it compiles (the forward/backward partition
    is decided then), so every (re)compile of a layer sees it; the process-wide setting stays as it was for
    anything else compiled."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(activation_memory_budget=LAYER_ACTIVATION_BUDGET):
        return compile_fx(graph, example_inputs)


@contextlib.contextmanager
def eager_layers(model: nn.Module):
    """Within `with`: compiled layers run eager (a forward without gradients, e.g. validation, would otherwise
    compile a second graph of every layer for a few batches)."""
    held = [(m, previous) for m in model.modules() if (previous := _set_compiled_call(m, None)) is not None]
    try:
        yield
    finally:
        for module, compiled in held:
            _set_compiled_call(module, compiled)


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
        _compile_forward(norm, CompiledNorm)
    for mlp in mlps:
        _compile_forward(mlp, CompiledGatedMlp)
    for layer in doras:
        layer.kernels = _dora_kernels()
    return CompiledKernels(len(norms), len(mlps), doras=len(doras))


def _probe(norms: list[nn.Module], mlps: list[nn.Module], autocast_dtype: torch.dtype | None) -> None:
    for module in norms:
        norm = copy.deepcopy(module)
        _compile_forward(norm, CompiledNorm)  # the class the real modules will have, so the guards match
        x = _probe_input(2, 3, norm.weight.shape[-1], dtype=norm.weight.dtype, device=norm.weight.device,
                         requires_grad=True)  # a norm's input has its weight's dtype (bf16 base; fp32 full tuning)
        _run_probe(lambda: norm(x), autocast_dtype, x.device)
    for mlp in mlps:
        # A floating weight (a 4-bit base stores uint8 codes): gate and up come out of (autocast) linear layers
        weight = next(p for p in mlp.parameters() if p.is_floating_point())
        dtype = autocast_dtype or weight.dtype
        gate, up = (_probe_input(2, 3, 8, dtype=dtype, device=weight.device, requires_grad=True) for _ in range(2))
        act = copy.deepcopy(mlp.act_fn)
        _run_probe(lambda: _gated_kernel()(act, gate, up), autocast_dtype, gate.device)


def _probe_dora(magnitude: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    """Both DoRA kernels once, on tensors shaped like a layer's (rows, out) output, as `_DoraLinear` calls them."""
    kernels = _dora_kernels()
    dtype = autocast_dtype or magnitude.dtype
    base, lora = (_probe_input(3, 8, dtype=dtype, device=magnitude.device) for _ in range(2))
    scale = _probe_input(8, dtype=magnitude.dtype, device=magnitude.device).abs() + 0.5
    with torch.no_grad():  # as inside an autograd.Function
        kernels.split_grad(lora, kernels.combine(base, lora, scale), scale)


def _run_probe(call: Callable[[], Any], autocast_dtype: torch.dtype | None, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = call()
    out.float().sum().backward()
