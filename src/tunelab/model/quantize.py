"""A quantized frozen base under LoRA (QLoRA-style): `int8` or `w8a8` (ours, torch only) or `nf4` (bitsandbytes).

    lora: {quantize_base: int8}     # or w8a8 (int8 products too), or nf4, which needs `pip install 'tunelab[quant]'`

Every linear layer of the base except the LM head (tied to the embeddings in most
small models) is stored quantized; embeddings and norms stay in the compute dtype.
LoRA weights stay fp32 and are saved in plain PEFT format, so an adapter trained over
a quantized base loads over the unquantized one (tests/model/test_quantize.py).

    model, tok = load_model(resolved, dtype, quantize=method)    # nf4: quantized while loading
    info = quantize_base(model, method, dtype)                    # int8: quantized here, in place
    console.print(info.describe())                                # method, layers, MB before -> after

Why these two. `bench/quantized_base.py --candidates` trains and evaluates each candidate
against the bf16 base in the same run (int8 kept 0.93x of the bf16 base's training speed
on the 2-core AMX VM; the table is in docs/benchmarks.md):

    int8 (Int8Linear below)          the fastest, and the bf16 base's first loss
    nf4 (bitsandbytes Linear4bit)    the smallest weights, a higher first loss
    torchao int8 weight-only         slower, and keeps a bf16 copy of every weight for backward
    bitsandbytes int8 (Linear8bitLt) the slowest (LLM.int8 in eval: fp16 math on CPU)
    HQQ 8-bit                        transformers 5.23 cannot load it (HqqConfig: "not available
                                     yet"), PEFT's 'all-linear' does not see HQQLinear, and
                                     quantizing is slow

`Int8Linear` is torchao's arithmetic (int8 weights, one scale per row, matmul in the
compute dtype) with a backward that re-casts the int8 weight instead of keeping a
copy: no dependency, one path for training and evaluation. nf4 is bitsandbytes' QLoRA
format, the standard on CUDA; it also runs on CPU (with the workaround in `quantize_base`
for CPUs with AVX512-BF16) and saves the most, but starts further from the bf16 base on
this small model (SmolLM2-135M: the gap was ~0.1 nats after 8 LoRA steps).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "w8a8", "nf4")
INSTALL_FIX = "pip install 'tunelab[quant]'  (or: pip install --no-deps bitsandbytes)"
DESCRIPTION = {
    "int8": "int8 weights, one scale per output row (tunelab Int8Linear)",
    "w8a8": "int8 weights, one scale per output row; activations and gradients int8 per row, products in int8 "
            "with int32 sums (tunelab W8A8Linear)",
    "nf4": "4-bit NormalFloat, blocks of 64, double-quantized scales (bitsandbytes Linear4bit, QLoRA)",
}


@dataclass(frozen=True)
class QuantizedInfo:
    """What the run log says about a quantized base (data.json or the manifest may record `as_dict()`)."""

    method: str  # "int8" | "nf4"
    layers: int  # linear layers stored quantized
    bytes_before: int  # the base's weights with those layers in the compute dtype
    bytes_after: int  # the base's weights as stored: quantized layers with their scales, and the rest

    def describe(self) -> str:
        """One line for the run log: method, how, layers, MB before -> after."""
        return (
            f"{self.method}: {DESCRIPTION[self.method]} on {self.layers} linear layers; base weights "
            f"{self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"({self.bytes_after / self.bytes_before:.2f}x); LoRA weights stay fp32"
        )

    def as_dict(self) -> dict:
        return {"method": self.method, "layers": self.layers, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after}


# The int8 product as two custom operators (forward, input gradient) rather than an autograd.Function:
# torch.compile then calls each as one opaque kernel. As an autograd.Function, traced into a compiled decoder
# layer, it made Inductor fail (`AssertionError: <class 'torch._inductor.ir.Pointwise'>`, torch 2.13).
@torch.library.custom_op("tunelab::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x @ q^T) * scale in x's dtype; int8 values are exact in bf16/fp16/fp32, so only the accumulation rounds."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # (..., out)


@int8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("tunelab::int8_linear_grad", mutates_args=())
def int8_linear_grad(grad: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The input gradient of `int8_linear`: (grad * scale) @ q, in grad's dtype."""
    return (grad * scale.to(grad.dtype)) @ q.to(grad.dtype)  # (..., in)


@int8_linear_grad.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(*grad.shape[:-1], q.shape[1])


def _int8_linear_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _, q, scale = inputs
    ctx.save_for_backward(q, scale)  # nothing but q and scale kept for backward


def _int8_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    q, scale = ctx.saved_tensors
    return int8_linear_grad(grad, q, scale), None, None


int8_linear.register_autograd(_int8_linear_backward, setup_context=_int8_linear_context)


class Int8Linear(torch.nn.Linear):
    """A frozen linear layer stored as int8 weights with one fp32 scale per output row.

    A subclass of nn.Linear so that PEFT's 'all-linear' finds it and wraps it with its
    plain LoRA layer (which calls this forward, then adds the adapter's output).
    `weight` is the int8 tensor (out, in): PEFT never casts integer weights.

    >>> layer = Int8Linear(torch.nn.Linear(4, 2))
    >>> layer.weight.dtype, layer.weight_scale.shape
    (torch.int8, torch.Size([2]))
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight first
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): symmetric, per output row
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = int8_linear(x.to(dtype), self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as the float matrix it stands for: (out, in), fp32."""
        return self.weight.float() * self.weight_scale[:, None]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scales (rows, 1)) of a 2-D tensor: symmetric, one scale per row (its largest |value| / 127)."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def _int8_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N), int8 in, int32 sums out: oneDNN's int8 GEMM (AVX512-VNNI / AMX-INT8 where the CPU has
    them, AVX2's byte multiplies else)."""
    return torch._int_mm(a, b)


def _rescale(sums: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 sums (rows, cols) -> sums * row_scale * col_scale in `dtype`."""
    return (sums.float() * row_scale * col_scale).to(dtype)


@functools.cache
def _fused() -> tuple[Callable, Callable]:
    """(quantize_rows, _rescale), each compiled into one loop over its tensor where torch.compile works here: eager,
    they are 4-7 passes over memory per product, which took back much of what the int8 product saves. Eager
    where compiling fails (no C++ compiler)."""
    try:
        quantize, rescale = (torch.compile(f, dynamic=True) for f in (quantize_rows, _rescale))
        x = torch.randn(3, 8)
        xq, xs = quantize(x)
        rescale(_int8_product(xq, xq.t()), xs, xs.reshape(1, -1), torch.float32)
        return quantize, rescale
    except Exception as exc:  # noqa: BLE001 - whatever stops Inductor here, the eager functions compute the same
        log.info("w8a8: row quantization runs eager (torch.compile failed: %s)", exc)
        return quantize_rows, _rescale


@torch.library.custom_op("tunelab::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x (q * scale)^T in x's dtype, with x's rows quantized to int8 and the product in int8 (int32 sums)."""
    quantize, rescale = _fused()
    xq, xs = quantize(x.reshape(-1, x.shape[-1]))
    y = rescale(_int8_product(xq, q.t()), xs, scale, x.dtype)  # (rows, out)
    return y.reshape(*x.shape[:-1], q.shape[0])


@w8a8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("tunelab::w8a8_linear_grad", mutates_args=())
def w8a8_linear_grad(grad: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The input gradient of `w8a8_linear`: (grad * scale) @ q, its rows quantized to int8 as the forward's
    (SwitchBack, Wortsman et al. 2023, does the same for the input gradient); in grad's dtype."""
    quantize, rescale = _fused()
    gq, gs = quantize(grad.reshape(-1, grad.shape[-1]) * scale)
    dx = rescale(_int8_product(gq, q), gs, 1.0, grad.dtype)  # (rows, in)
    return dx.reshape(*grad.shape[:-1], q.shape[1])


@w8a8_linear_grad.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(*grad.shape[:-1], q.shape[1])


def _w8a8_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    q, scale = ctx.saved_tensors
    return w8a8_linear_grad(grad, q, scale), None, None


w8a8_linear.register_autograd(_w8a8_linear_backward, setup_context=_int8_linear_context)


class W8A8Linear(Int8Linear):
    """Int8Linear whose products run in int8: the input's rows are quantized on the fly (one scale per row), the
    product sums in int32, and the result is scaled back; the input gradient likewise.

    Why: the frozen base's two products per layer (forward, input gradient) are most of a LoRA step, and int8
    multiplies run several times faster than fp32 ones on CPUs with int8 dot products (AVX512-VNNI, AMX-INT8;
    docs/benchmarks.md has the figures per CPU class). The rounding of the activations and gradients is the price:
    what it costs in accuracy is measured there too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = w8a8_linear(x.to(dtype), self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantization_available(method: str, device: str | None = None) -> tuple[bool, str]:
    """Whether `method` can quantize a base on `device` here, and if not, why."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if method not in METHODS:
        return False, f"unknown quantization '{method}' (choose one of {', '.join(METHODS)})"
    if method == "w8a8" and device != "cpu":  # CUDA's int8 GEMM wants > 16 rows and sizes in multiples of 8
        return False, f"w8a8 runs on the CPU only (not {device}); int8 or nf4 quantize a base there"
    if method in ("none", "int8", "w8a8"):  # torch only
        return True, "built in"
    for package in ("bitsandbytes", "accelerate"):  # transformers' bitsandbytes loader needs both
        if importlib.util.find_spec(package) is None:
            return False, f"nf4 needs the package {package}, which is not installed"
    import bitsandbytes

    if device not in getattr(bitsandbytes, "supported_torch_devices", {"cuda"}):
        return False, f"the installed bitsandbytes {bitsandbytes.__version__} has no backend for {device}"
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):  # the wheel has no native library for this platform
        return False, f"bitsandbytes {bitsandbytes.__version__} found no native library for {device} on this machine"
    return True, f"bitsandbytes {bitsandbytes.__version__} on {device}"


def require_quantization(method: str, device: str | None = None, *, tuning: str = "lora", use_dora: bool = False) -> None:
    """Raise a TunelabError (what, why, fix) when `method` cannot run here, or not with this tuning:
    call it before loading anything."""
    ok, reason = quantization_available(method, device)
    if not ok:
        if method == "w8a8":
            fix = "set lora.quantize_base: int8 or none, or train on a machine without CUDA (CUDA_VISIBLE_DEVICES=\"\")"
        elif method in METHODS:
            fix = f"{INSTALL_FIX}, or set lora.quantize_base: int8 (built in) or none"
        else:
            fix = "set lora.quantize_base to none, int8, w8a8 or nf4"
        raise TunelabError(f"lora.quantize_base '{method}' is not available: {reason}", fix=fix)
    if method != "none" and tuning != "lora":
        raise TunelabError(f"lora.quantize_base '{method}' with tuning '{tuning}': a quantized base cannot be trained",
                           fix="set lora.quantize_base: none for full tuning, or tuning: lora")
    if method in ("int8", "w8a8") and use_dora:  # PEFT's DoRA reads base_layer.weight: the raw int8 codes
        raise TunelabError(f"lora.use_dora with lora.quantize_base '{method}': PEFT's DoRA cannot read int8 weights",
                           fix="set lora.quantize_base: nf4 or none, or lora.use_dora: false")


def quantization_config(method: str, compute_dtype: torch.dtype):
    """The loader hook: `from_pretrained(quantization_config=...)`; None unless `method` is nf4.

    nf4 is quantized by transformers while loading, tensor by tensor, so the whole base
    never sits in memory unquantized. `compute_dtype` is the dtype the dequantized
    weights are multiplied in (bf16 under bf16 autocast, else fp32).
    """
    if method != "nf4":
        return None
    require_quantization(method)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantize_base(model: torch.nn.Module, method: str, compute_dtype: torch.dtype) -> QuantizedInfo | None:
    """Quantize the base in place (int8) or finish what the loader did (nf4); None for 'none'.

    Call it after loading and before attaching LoRA.
    """
    require_quantization(method)
    if method == "none":
        return None
    stored = weight_bytes(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if method in ("int8", "w8a8"):
        layer_type = Int8Linear if method == "int8" else W8A8Linear
        targets = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer_type(linear))
        return QuantizedInfo(method, len(targets), stored, weight_bytes(model))

    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise TunelabError(
            "lora.quantize_base 'nf4': the model was loaded without 4-bit layers",
            fix="load it with tunelab.model.load.load_model(..., quantize='nf4') (quantization_config='nf4')",
        )
    for layer in layers:
        # Workaround (bitsandbytes 0.50.2, CPUs with AVX512-BF16): the first eval-mode forward without grad
        # (a validation loss) repacks the weight for a CPU inference kernel that has no backward, and later
        # training forwards use that kernel: the gradient through every base layer is silently dropped
        # (torch only warns "an autograd kernel was not registered"). Not repacking keeps nf4 trainable.
        layer.support_avx512bf16_for_cpu = False
    size = torch.finfo(compute_dtype).bits // 8
    unquantized = sum((m.in_features + (m.bias is not None)) * m.out_features * size for m in layers)
    held = sum(_plain_bytes(m.state_dict(keep_vars=True).values()) for m in layers)
    return QuantizedInfo("nf4", len(layers), stored - held + unquantized, stored)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base's weights as stored: every state-dict tensor (quantization scales included,
    LoRA excluded), tied weights counted once."""
    tensors = [t for name, t in model.state_dict(keep_vars=True).items() if "lora_" not in name]
    return _plain_bytes(tensors)


def _plain_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        for part in _plain_parts(tensor):
            ptr = part.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += part.numel() * part.element_size()
    return total


def _plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a wrapper subclass's inner tensors (torchao)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [p for n in names if (inner := getattr(tensor, n)) is not None for p in _plain_parts(inner)]
