"""Every speed trick behind one switch: `model.kernels: tunelab` (the default) or `reference`.

    tunelab    tunelab's own kernels, each tested against the reference below:
                 attention.py   grouped-query attention without KV copies (CPU; SDPA on CUDA)
                 fused_lora.py  LoRA's update added by the base product's own matmul; DoRA by
                 dora.py        a weight norm that never builds the adapted weight
                 compiled.py    torch.compile for the elementwise chains (RMSNorm, gated MLP, DoRA's
                                scaling) and, on long runs, for whole decoder layers
                 head_loss.py   the LM head and the cross-entropy in row chunks (no vocab-wide tensor kept)
                 prefix.py      a prompt prefix every row shares, computed once
                 packed.py      serving: frozen weights packed once in oneDNN's layout (ServeConfig.weight_layout)
    reference  plain PEFT and transformers: PEFT's own LoRA and DoRA layers, transformers' SDPA attention,
               nothing compiled, the plain cross-entropy, every row computed whole. The path the kernels
               are checked against in tests, and the one to take to rule them out when something looks
               wrong (`--set model.kernels=reference`). Same adapters, same files: only speed differs, and
               the last bits of bf16 rounding.

The switch is read where a model is loaded (`model.load`: attention, LoRA layer classes) and where a
run is set up (`training.setup`: compiled kernels, the loss, the prefix layout).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Kernels = Literal["tunelab", "reference"]
KERNELS: tuple[str, ...] = ("tunelab", "reference")


def attention_implementation(kernels: Kernels, device: str | None = None) -> str:
    """transformers' `attn_implementation`: tunelab's grouped-query attention on CPU, else SDPA."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kernels == "tunelab" and device == "cpu":
        from tunelab.model.kernels import attention  # registers the implementation with transformers

        return attention.NAME
    return "sdpa"


def lora_layer_classes(kernels: Kernels) -> dict[type[nn.Module], type[nn.Module]]:
    """base layer type -> LoRA layer class for PEFT to build (`peft.LoraConfig._register_custom_module`);
    empty for the reference path (PEFT's own layers)."""
    if kernels == "reference":
        return {}
    from tunelab.model.kernels.fused_lora import lora_layer_classes as fused

    return fused()


def swap_class(module: nn.Module, cls: type) -> None:
    """Give `module` the class `cls` in place (its parameters, buffers and state-dict keys stay).

    The one place tunelab changes a module's class. Used only for the compiled elementwise kernels
    (`compiled.py`: an RMSNorm's forward compiled, a gated MLP's activation fused), where
    `cls` is a subclass of the module's own class that overrides `forward` alone, and to undo that.
    Why not replace the module: its parent, PEFT's wrappers and the state dict refer to it by
    name, and a wrapper module would rename its parameters (`mlp.inner.up_proj`). Why not
    `nn.Module.compile`: it compiles the whole MLP, LoRA layers included, which costs a compile
    of minutes where this costs seconds. (The `kernels` package that transformers uses for Hub kernels
    swaps forwards too, as an instance attribute, for kernels fetched from the Hub, which tunelab never does.)
    """
    module.__class__ = cls
