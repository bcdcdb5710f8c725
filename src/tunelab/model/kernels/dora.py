"""DoRA's weight norm without building the adapted weight: the same forward as PEFT's, cheaper.

DoRA (https://huggingface.co/papers/2402.09353) scales each output row of a LoRA-adapted
layer by `m / ||W + s·BA||`, the norm detached from the graph (the paper's section 4.3).
PEFT computes that norm on every forward by materialising the full adapted weight: it
casts the base weight to the input's dtype (fp32), forms `BA` for the whole matrix, adds
them and takes the row norms; about four weight-sized tensors per layer per step. That made
a DoRA step of SmolLM2 twice as slow as a LoRA step (2-core AMX VM).

The norm needs none of that. Per output row i,

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ

`||W_i||²` is fixed (the base is frozen) and computed once; `W Aᵀ` is the base layer run
on the r rows of A (r tokens' worth of work, and it works unchanged for a 4-bit base);
`A Aᵀ` is r×r. PEFT keeps everything else: its parameters, file format, merging and
`get_weight_norm` for merges. The layer's input cast is switched off too, because this
norm no longer depends on the input's dtype (see `tunelab.model.load.adapter_inputs_uncast`).

The output is combined in one step as well. PEFT adds `(g-1)·base + g·s·lora` to the
base output, with `g = m / norm`: in fp32 under bf16 autocast, about six activation-sized
tensors per layer forward and more in backward. `_ScaleAdapted` forms `g·(base + s·lora)`
in two kernels forward, rounding once so that small magnitude updates are not rounded
away (its docstring says why that matters).

Over a frozen bias-free `nn.Linear` (the usual bf16 base), with torch.compile available,
`_DoraLinear` goes further: the base product, the adapter and the scaling in one autograd
node, like `fused_lora._LoraLinear` for plain LoRA (its docstring has the formulas).

PEFT offers no such path, hence the hand-written identity; `tests/model/kernels/test_dora.py` checks it
against PEFT's own layer (outputs, gradients, a 4-bit base, reload).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from torch import nn


class RowNormDoraLayer(DoraLinearLayer):
    """PEFT's DoraLinearLayer whose forward computes the weight norm by the identity above."""

    kernels: DoraKernels | None = None  # set where compiled (`compiled.use_compiled_kernels`): then `fused_output` may run

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._base_row_sq: torch.Tensor | None = None  # ||W_i||^2 per output row, once per training (re)start

    def train(self, mode: bool = True) -> RowNormDoraLayer:
        # Like PEFT's cache: forget the base's row norms whenever training (re)starts, so a
        # base changed in between (a merge and unmerge) is read afresh.
        if mode:
            self._base_row_sq = None
        return super().train(mode)

    @torch.no_grad()
    def weight_norm(self, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float, base_layer: nn.Module,
                    dtype: torch.dtype) -> torch.Tensor:
        """`||W + scaling·BA||` per output row, fp32, shape (out_features,)."""
        cached = getattr(self, "_base_row_sq", None)
        if cached is None or cached.device != lora_A.weight.device:  # first use, or the model moved since
            self._base_row_sq = dequantize_module_weight(base_layer).float().pow(2).sum(dim=1)
        a = lora_A.weight
        w_at = base_layer(a.to(dtype))  # (r, out) = A Wᵀ (+ bias), in the base's own precision
        with torch.autocast(a.device.type, enabled=False):  # the small rest in fp32, not autocast's bf16
            a, b = a.float(), lora_B.weight.float()  # (r, in), (out, r)
            w_at = w_at.float()
            if getattr(base_layer, "bias", None) is not None:
                w_at = w_at - base_layer.bias.float()
            cross = (b * w_at.t()).sum(dim=1)
            lora_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
            squared = self._base_row_sq + 2 * scaling * cross + scaling * scaling * lora_sq
        return squared.clamp_min(0).sqrt()

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        """PEFT's contract: the amount to add to the base output (used with LoRA dropout on)."""
        weight_norm = self.weight_norm(lora_A, lora_B, scaling, base_layer, x.dtype)
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:  # dropout on: PEFT recomputes the base on the dropped-out input
            base_result = base_layer(x)
        if getattr(base_layer, "bias", None) is not None:
            base_result = base_result - base_layer.bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def scaled_output(self, x: torch.Tensor, result: torch.Tensor, *, lora_A: nn.Linear, lora_B: nn.Linear,
                      scaling: float, base_layer: nn.Module) -> torch.Tensor:
        """The layer's whole output `g·(result - bias + s·lora) + bias`, when `result` is the base on this `x`."""
        scale = self.weight / self.weight_norm(lora_A, lora_B, scaling, base_layer, x.dtype)
        lora_result = lora_B(lora_A(x)).to(result.dtype)
        bias = getattr(base_layer, "bias", None)
        if bias is None:
            return _ScaleAdapted.apply(result, lora_result, scale, scaling)
        return _ScaleAdapted.apply(result - bias, lora_result, scale, scaling) + bias

    def fused_output(self, x: torch.Tensor, *, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float,
                     base_layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        """The layer's whole output by `_DoraLinear`, over a frozen bias-free `nn.Linear` whose weight is in
        the compute `dtype`; needs `kernels`."""
        assert self.kernels is not None
        scale = self.weight / self.weight_norm(lora_A, lora_B, scaling, base_layer, dtype)
        a_c = lora_A.weight.detach().to(dtype)  # detach: the parameter itself goes in once, for its gradient
        return _DoraLinear.apply(x, base_layer.weight, a_c, lora_B.weight, scale, lora_A.weight, scaling, self.kernels)


class _ScaleAdapted(torch.autograd.Function):
    """`scale·(base + scaling·lora)` per output column, in two kernels forward and four or
    five backward. Hand-written because eager autograd would keep an fp32 copy of every
    intermediate (see the module docstring).

    Rounding matters in bf16. DoRA's scale is `1 + δ` with δ often below bf16's half step
    (2^-9). Rounding `base + s·lora` to bf16 and then scaling rounds δ away on every element
    (the sum is on bf16's grid, and moving it by less than half a step rounds back), so the
    magnitudes stop acting on the forward pass: on the demo data, 32 steps, the validation
    loss was 0.674 against PEFT's 0.653. PEFT rounds its fp32 sum once, where δ survives on
    average. Here `scale·base` is computed in fp32 inside one `addcmul` onto the bf16 LoRA
    term and rounded once: the validation loss is back at PEFT's level, and the pass is slower
    than the version that loses δ but far faster than PEFT's fp32 expression (docs/benchmarks.md
    has the losses and timings). Gradients stay in bf16: there a relative error of δ is noise,
    not a lost signal.
    """

    @staticmethod
    def forward(ctx: Any, base: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, scaling: float) -> torch.Tensor:
        deviation = (scale - 1).to(base.dtype)  # δ: small, so bf16 keeps its relative precision (backward)
        lora_scale = (scale * scaling).to(base.dtype)
        out = torch.empty_like(base)
        torch.addcmul(lora * lora_scale, base, scale, out=out)  # s·scale·lora + scale·base, in fp32, rounded once
        ctx.save_for_backward(base, lora, deviation, lora_scale)
        ctx.scale_dtype = scale.dtype
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        base, lora, deviation, lora_scale = ctx.saved_tensors
        grad_base = torch.addcmul(grad_out, grad_out, deviation)  # grad·scale
        grad_lora = grad_out * lora_scale if ctx.needs_input_grad[1] else None
        grad_scale = None
        if ctx.needs_input_grad[2]:
            summed = torch.add(base, lora, alpha=ctx.scaling)
            grad_scale = (grad_out * summed).flatten(0, -2).sum(0, dtype=torch.float32).to(ctx.scale_dtype)
        return grad_base, grad_lora, grad_scale, None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 at least (bf16 widened; fp64 kept, for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def combine(base: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale·base + lora` in fp32, rounded once to the base's dtype (`_ScaleAdapted` says why once)."""
    return (_wide(base) * scale + _wide(lora)).to(base.dtype)


def split_grad(grad: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`grad·scale` in grad's dtype (the base product's share), and `Σ_rows grad·out` in fp32 (for the scale)."""
    wide = _wide(grad)
    return (wide * scale).to(grad.dtype), (wide * _wide(out)).sum(0)


class DoraKernels(NamedTuple):
    """The two elementwise passes of `_DoraLinear`, compiled into one loop each (`tunelab.model.kernels.compiled`)."""

    combine: Callable[..., torch.Tensor]
    split_grad: Callable[..., tuple[torch.Tensor, torch.Tensor]]


class _DoraLinear(torch.autograd.Function):
    """A DoRA layer over a frozen plain `nn.Linear` without bias, in one autograd node:
    `y = g·(x Wᵀ + s·(x Aᵀ) Bᵀ)`, with `g = m / ||W + s·BA||` given as `scale` (its gradient
    reaches m through autograd; the norm is detached, as in PEFT).

    Why beside `_ScaleAdapted`: PEFT's layer runs the base, then lora_A and lora_B as modules,
    then combines; backward adds the base's and the adapter's input gradients as two tensors and
    passes fp32 copies around. Here, as in `fused_lora._LoraLinear`:

        forward:  h = x Aᵀ;  y = round(g·(x Wᵀ) + h (g·s·B)ᵀ)     g folded into B (out x r)
        backward: G_b = G·g;  g_h = G (g·s·B)
                  dx = G_b W + g_h A            accumulated by addmm_, one tensor
                  dA = g_hᵀ x;  dB = g·s·(Gᵀ h)
                  dg = Σ_rows G·y / g           y = g·(...), so this is Σ G·(x Wᵀ + s·lora)

    `dg` from the output itself (which the next layer usually keeps anyway: the MLP's activation
    saves gate and up) instead of saving the base product as `_ScaleAdapted` must. The two
    elementwise passes are `kernels` (compiled: one loop each; measured in `docs/benchmarks.md`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a_c: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                a: torch.Tensor, scaling: float, kernels: DoraKernels) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(w.dtype)  # (M, in)
        b_folded = (b * (scale * scaling).unsqueeze(1)).to(w.dtype)  # g·s·B, (out, r)
        h = x2 @ a_c.t()  # (M, r)
        out = kernels.combine(x2 @ w.t(), h @ b_folded.t(), scale)
        ctx.save_for_backward(x2, w, a_c, b_folded, h, out, scale)
        ctx.scaling, ctx.kernels, ctx.x_meta, ctx.param_dtypes = scaling, kernels, (x.shape, x.dtype), (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, w, a_c, b_folded, h, out, scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)  # (M, out)
        needs_x, _, _, needs_b, needs_scale, needs_a, _, _ = ctx.needs_input_grad
        grad_base, grad_out_sum = ctx.kernels.split_grad(g, out, scale)
        g_h = g @ b_folded  # (M, r)
        x_shape, x_dtype = ctx.x_meta
        grad_x = (grad_base @ w).addmm_(g_h, a_c).view(x_shape).to(x_dtype) if needs_x else None
        grad_a = (g_h.t() @ x2).to(ctx.param_dtypes[0]) if needs_a else None
        grad_b = None
        if needs_b:
            grad_b = (g.t() @ h).to(ctx.param_dtypes[1]).mul_((scale * ctx.scaling).unsqueeze(1).to(ctx.param_dtypes[1]))
        grad_scale = (grad_out_sum / scale).to(scale.dtype) if needs_scale else None
        return grad_x, None, None, grad_b, grad_scale, grad_a, None, None


class RowNormDoraVariant(DoraLinearVariant):
    """PEFT's DoRA variant with `RowNormDoraLayer` as its magnitude layer, combining the output in one step
    when the base output can be reused. tunelab's LoRA layers choose it (`fused_lora._FusedAdapter`)."""

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """PEFT's initialisation (magnitude = the adapted weight's row norms), then the same layer as a
        `RowNormDoraLayer`: only the forward differs, so parameters and state-dict keys are PEFT's."""
        DoraLinearVariant.init(module, adapter_name, **kwargs)
        peft_layer = module.lora_magnitude_vector[adapter_name]
        layer = RowNormDoraLayer(fan_in_fan_out=peft_layer.fan_in_fan_out)
        layer.weight = peft_layer.weight
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        dora = module.lora_magnitude_vector[active_adapter]
        reuses_base = isinstance(module.lora_dropout[active_adapter], nn.Identity) or not module.training
        if not isinstance(dora, RowNormDoraLayer) or not reuses_base:
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        return dora.scaled_output(x, result, lora_A=module.lora_A[active_adapter], lora_B=module.lora_B[active_adapter],
                                  scaling=module.scaling[active_adapter], base_layer=module.get_base_layer())
