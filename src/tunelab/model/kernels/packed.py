"""Frozen linear layers whose weights are packed once into oneDNN's blocked layout (serving).

A decode step multiplies a few rows by every weight matrix of the model. `F.linear` hands each
weight to the GEMM kernel in PyTorch's plain layout, and the kernel re-blocks it on every call; for
a few rows that is much of the call's time. The base model's weights never change while serving,
so they are packed once, at start: the same oneDNN operators torch.compile's freezing pass emits
for inference (`mkldnn._reorder_linear_weight` / `mkldnn._linear_pointwise`), without compiling.

    packing_speedup(torch.bfloat16)    # plain time / packed time of a decode-sized product; None if unavailable
    pack_linears(model, ["model.layers.0.mlp.up_proj", "lm_head"], rows_hint=16)

Whether it pays is measured where it runs (`packing_speedup`), not assumed: the operators exist in
x86 builds of torch with oneDNN; elsewhere, or where a call fails, the layers stay as they are.
Results: bf16 matched `F.linear` bit for bit in our checks; fp32 differs in the last bits (another
summation order), so fp32 tests that compare tokens with plain PEFT run unpacked.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.model.precision import speedup


class PackedLinear(nn.Module):
    """`linear`'s product with its weight packed once (read-only: it cannot be trained or saved)."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # persistent=False: not part of any state dict; the plain weight stays where it was (e.g. tied embeddings)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_speedup(dtype: torch.dtype, rows: int = 8, k: int = 576, n: int = 1536, repeats: int = 15) -> float | None:
    """Plain time / packed time of one (rows, k) x (k, n) product in `dtype`; None where packing is unavailable.

    Timed by `precision.speedup` (alternating, fastest call of each); its own generator (no draw from the global
    RNG).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    linear = torch.nn.utils.skip_init(nn.Linear, k, n, bias=False, dtype=dtype)  # no draw from the global RNG
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator))
        try:
            packed = PackedLinear(linear, rows)
            if not torch.allclose(packed(x).float(), linear(x).float(), rtol=1e-2, atol=1e-2):
                return None  # a packed product that computes something else: never use it
        except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN, or not for this dtype
            return None

        return speedup(lambda: linear(x), lambda: packed(x), repeats)


def pack_linears(model: nn.Module, names: list[str], rows_hint: int) -> None:
    """Replace each named nn.Linear of `model` by a PackedLinear of it."""
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear), f"{name} is {type(linear).__name__}, not nn.Linear"
        model.set_submodule(name, PackedLinear(linear, rows_hint))
