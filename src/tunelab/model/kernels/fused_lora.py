"""LoRA's update added to the base output in one matrix product: fewer passes over the activations.

PEFT adds a LoRA adapter to a layer's output as `result + lora_B(lora_A(x)) * scaling`:
forward, the rank-r product writes a new output-sized tensor, the scaling reads and
writes it again and the sum a third time; backward, autograd repeats that pattern (a
scaled copy of the gradient, then the input gradient of the adapter as a new tensor
added to the base's). The adapter's own arithmetic is ~3% of the layer's, yet those
passes made an adapted layer of SmolLM2 cost about twice the frozen base layer alone
(2-core AMX VM; the timing is in docs/benchmarks.md).

`_AddLora` does the same arithmetic with the scaling folded into B (an r-wide matrix)
and the sum done by the matrix product itself (`addmm_` into the base output):

    forward:  h = x Aᵀ                      (M, r)
              result += h (s·B)ᵀ            in place, one pass
    backward: g_h = g (s·B)                 (M, r)
              g_x = g_h A                   the adapter's share of the input gradient
              g_A = g_hᵀ x,  g_B = s·gᵀ h   the adapter's weight gradients
              g_result = g                  passed through, not copied

Over a frozen plain `nn.Linear` base, `_LoraLinear` goes one step further: the base
product and the adapter in one autograd node, so backward accumulates the adapter's
input gradient into the base's (`(g W).addmm_(g_h, A)`) instead of autograd adding two
tensors. A quantized base (int8, NF4) keeps its own forward, and `_AddLora` adds onto it.

Only the class of PEFT's plain `lora.Linear` changes (`FusedLoraLinear`), and only its
forward, and only where the fused path computes what PEFT's does: one active adapter,
no variant (except tunelab's DoRA with its kernels compiled, which goes to the one-node
`tunelab.model.kernels.dora._DoraLinear` over a bias-free plain linear base), no dropout while training,
no bias on B, not merged. Anything else takes PEFT's own forward. Parameters, adapter
files and merging stay PEFT's. PEFT's bitsandbytes `Linear4bit` (QLoRA) gets `_AddLora` too.
PEFT has no such path (its forward is written for every variant at once), hence this
module. `tests/model/kernels/test_fused_lora.py` checks outputs and gradients against PEFT's forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tunelab.model.kernels.dora import RowNormDoraLayer, RowNormDoraVariant


class _AddLora(torch.autograd.Function):
    """`result + (x Aᵀ) (s·B)ᵀ`, written into `result` (the base layer's fresh output).

    `a_c`, `b_scaled`: A and s·B in the compute dtype; `a`, `b`: the parameters themselves,
    which receive the gradients.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a_c: torch.Tensor, b_scaled: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(result.dtype)  # (M, in); a view when x is already in the compute dtype
        h = x2 @ a_c.t()  # (M, r)
        result.view(-1, result.shape[-1]).addmm_(h, b_scaled.t())
        ctx.mark_dirty(result)
        ctx.save_for_backward(x2, a_c, b_scaled, h)
        ctx.scaling, ctx.x_meta, ctx.param_dtypes = scaling, (x.shape, x.dtype), (a.dtype, b.dtype)
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, a_c, b_scaled, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(b_scaled.dtype)  # (M, out)
        g_h = g @ b_scaled  # (M, r): the scaling is in b_scaled
        _, needs_x, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        x_shape, x_dtype = ctx.x_meta
        grad_x = (g_h @ a_c).view(x_shape).to(x_dtype) if needs_x else None
        return grad, grad_x, None, None, *_adapter_grads(ctx, g, g_h, x2, h, needs_a, needs_b), None


def _adapter_grads(ctx: Any, g: torch.Tensor, g_h: torch.Tensor, x2: torch.Tensor, h: torch.Tensor,
                   needs_a: bool, needs_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LoRA's weight gradients in the parameters' dtypes: `g_A = g_hᵀ x`, `g_B = s·gᵀ h`."""
    grad_a = (g_h.t() @ x2).to(ctx.param_dtypes[0]) if needs_a else None
    grad_b = (g.t() @ h).to(ctx.param_dtypes[1]).mul_(ctx.scaling) if needs_b else None
    return grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """`x Wᵀ (+ bias) + (x Aᵀ) (s·B)ᵀ` for a frozen plain `nn.Linear` base: the base product and the
    adapter in one autograd node.

    Why beside `_AddLora`: with the base layer as its own node, autograd computes the base's
    input gradient `g W` and the adapter's `g_h A` as two tensors and adds them (one more
    output-sized pass and allocation per adapted layer, 210 per SmolLM2 step). Here the
    adapter's share is accumulated into the base's by `addmm_`. Operands in the compute dtype:
    `w`, `bias`, `a_c`, `b_scaled`; `a`, `b`: the LoRA parameters, which receive the gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a_c: torch.Tensor,
                b_scaled: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(w.dtype)  # (M, in)
        result = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())  # (M, out)
        h = x2 @ a_c.t()  # (M, r)
        result.addmm_(h, b_scaled.t())
        ctx.save_for_backward(x2, w, a_c, b_scaled, h)
        ctx.scaling, ctx.x_meta, ctx.param_dtypes = scaling, (x.shape, x.dtype), (a.dtype, b.dtype)
        return result.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, w, a_c, b_scaled, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)  # (M, out)
        g_h = g @ b_scaled  # (M, r): the scaling is in b_scaled
        needs_x, _, _, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        x_shape, x_dtype = ctx.x_meta
        grad_x = (g @ w).addmm_(g_h, a_c).view(x_shape).to(x_dtype) if needs_x else None
        return grad_x, None, None, None, None, *_adapter_grads(ctx, g, g_h, x2, h, needs_a, needs_b), None


class _FusedAdapter:
    """What both fused classes share: when the fused path computes what PEFT's would, `_AddLora` onto
    a base's output, and DoRA by the row-norm identity (`dora.RowNormDoraVariant`). Mixed in before a
    PEFT LoRA layer class."""

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
        """PEFT's choice of variant, with its DoRA replaced by tunelab's row-norm DoRA (same parameters)."""
        variant = super().resolve_lora_variant(config=config, **kwargs)
        return RowNormDoraVariant() if type(variant) is DoraLinearVariant else variant

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter, when `_AddLora` computes what PEFT's forward would; otherwise None."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if self.lora_B[name].bias is not None:
            return None
        if name in self.lora_variant and not _fused_dora(
                self.lora_variant[name], self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else None):
            return None
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None
        # Without autocast PEFT computes the adapter in its weights' dtype (its input cast, or a dtype error):
        # fused only when that is also the input's dtype.
        if not torch.is_autocast_enabled(x.device.type) and self.lora_A[name].weight.dtype != x.dtype:
            return None
        return name

    def _add_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
        """`result + s·B(A(x))` by `_AddLora`, written into `result` (the base's fresh output); None where
        that output is not a plain tensor in the compute dtype (not expected from a linear layer; PEFT's
        path handles anything)."""
        if not result.is_contiguous() or result.dtype != _compute_dtype(x) or result._base is not None:
            return None
        a, b, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        with torch.no_grad():  # the operands in the compute dtype; `_AddLora` gives A and B their gradients
            # detach: never `a` itself as a second input (torch.compile cannot trace a Function given one
            # tensor twice, which fp32 training would do)
            a_c, b_scaled = a.detach().to(result.dtype), (b * scaling).to(result.dtype)
        return _AddLora.apply(result, x, a_c, b_scaled, a, b, scaling)


class FusedLoraLinear(_FusedAdapter, LoraLinear):
    """PEFT's LoRA `Linear`, whose forward computes a plain adapter by `_LoraLinear` (over a frozen
    `nn.Linear`) or `_AddLora` (over any other base, e.g. int8); see the module docstring."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else self._fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        a, b, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        base = self.base_layer
        dtype = _compute_dtype(x)
        # The base's weight already in the compute dtype (bf16 under autocast): never a silent cast that
        # the base layer itself would have refused.
        fusable_base = (_frozen_plain_linear(base) and base.weight.dtype == dtype and not base._forward_hooks
                        and not base._forward_pre_hooks)
        if adapter in self.lora_variant:  # DoRA with compiled kernels (`_fusable_adapter`)
            if not fusable_base or base.bias is not None:
                return super().forward(x)
            return self.lora_magnitude_vector[adapter].fused_output(
                x, lora_A=self.lora_A[adapter], lora_B=self.lora_B[adapter], scaling=scaling, base_layer=base, dtype=dtype)
        if fusable_base:
            with torch.no_grad():  # the operands in the compute dtype (no copy where already in it)
                w, a_c, b_scaled = base.weight, a.detach().to(dtype), (b * scaling).to(dtype)  # detach: see above
                bias = None if base.bias is None else base.bias.to(dtype)
            return _LoraLinear.apply(x, w, bias, a_c, b_scaled, a, b, scaling)
        fused = self._add_adapter(adapter, x, base(x))
        return super().forward(x) if fused is None else fused


class Fused4bitLinear(_FusedAdapter):
    """Mixed in before PEFT's bitsandbytes `Linear4bit` (a 4-bit NF4/FP4 base, QLoRA): a plain adapter by
    `_AddLora` onto the base's output. PEFT's forward clones that output first ("defensively", for a
    view that autograd could not modify in place) and then adds the adapter in three more passes;
    `_add_adapter` steps aside for a view. DoRA and the rest take PEFT's forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else self._fusable_adapter(x)
        if adapter is None or adapter in self.lora_variant:
            return super().forward(x, *args, **kwargs)
        fused = self._add_adapter(adapter, x, self.base_layer(x))
        return super().forward(x) if fused is None else fused


def _fused_dora(variant: object, magnitude: nn.Module | None) -> bool:
    """tunelab's row-norm DoRA with its elementwise kernels compiled (`tunelab.model.kernels.dora._DoraLinear`)."""
    return (isinstance(variant, RowNormDoraVariant) and isinstance(magnitude, RowNormDoraLayer)
            and magnitude.kernels is not None)


def _frozen_plain_linear(layer: nn.Module) -> bool:
    """An `nn.Linear` itself (not a quantized subclass) whose weight and bias train nothing."""
    return type(layer) is nn.Linear and not layer.weight.requires_grad and (
        layer.bias is None or not layer.bias.requires_grad)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@functools.cache
def lora_layer_classes() -> dict[type[nn.Module], type[nn.Module]]:
    """base layer type -> the LoRA layer class PEFT should build over it (`LoraConfig._register_custom_module`).

    PEFT's custom-module mapping (its documented, experimental extension point, "custom models" in
    PEFT's developer guide) matches with isinstance in insertion order, so the bitsandbytes 4-bit
    layer, itself an `nn.Linear`, comes first. Adapters save and load exactly as PEFT's own layers.
    """
    classes: dict[type[nn.Module], type[nn.Module]] = {}
    four_bit = _peft_4bit_class()
    if four_bit is not None:
        import bitsandbytes as bnb

        classes[bnb.nn.Linear4bit] = type(f"Fused{four_bit.__name__}", (Fused4bitLinear, four_bit), {})
    classes[nn.Linear] = FusedLoraLinear
    return classes


def _peft_4bit_class() -> type | None:
    """PEFT's LoRA layer over a bitsandbytes 4-bit base, or None where bitsandbytes is not installed."""
    from peft.import_utils import is_bnb_4bit_available

    if not is_bnb_4bit_available():
        return None
    from peft.tuners.lora.bnb import Linear4bit

    return Linear4bit


def uncast_adapter_inputs(model: nn.Module) -> None:
    """Switch off PEFT's cast of each adapted layer's input to the adapter's dtype, where nothing needs it.

    Why: PEFT casts the input of every LoRA layer to its weights' dtype (fp32 here) before lora_A, and
    under bf16 autocast lora_A casts it straight back to bf16: two copies of the layer's input and two
    more in backward, for a bitwise-identical result (bf16 -> fp32 -> bf16 is exact). In fp32 the input
    already has the adapter's dtype and nothing changes. Every forward of a bf16 base runs under
    autocast (`Precision.autocast`); without it lora_A would raise a dtype error, never compute silently
    in another precision. PEFT's own DoRA layer needs the cast (it computes its weight norm in the
    input's dtype); tunelab's row-norm DoRA does not, so its layers lose the cast, and any other
    variant keeps it.
    """
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and _input_dtype_free(module):
            module.cast_input_dtype_enabled = False


def _input_dtype_free(module: BaseTunerLayer) -> bool:
    """True when no adapter of this layer computes anything in its input's dtype."""
    variants = getattr(module, "lora_variant", None) or {}
    magnitudes = getattr(module, "lora_magnitude_vector", None) or {}
    return all(name in magnitudes and isinstance(magnitudes[name], RowNormDoraLayer) for name in variants)
