"""Many LoRA adapters in one batch: each row of a forward pass uses its own adapter, or none.

Every linear layer an adapter may target is wrapped once, at server start, in a `MultiLoraLinear`
that holds the base layer and a table of adapter slots:

    A: (S, R, in)   slot s's down-projection in A[s], as PEFT stores it (r, in); R is the largest rank
                    served, and a smaller rank is padded with zero rows, which adds exactly nothing.
                    Each slot is one contiguous block, and so is any run of adjacent slots: a decode step
                    reads them sequentially (a slot strided across the others' columns read 3-5x slower)
    B: (S, R, out)  slot s's up-projection with its scale (alpha / r) folded in; zero rows pad

    slot 0 holds zeros: the base model. A slot whose adapter does not target this layer holds zeros too.

    y = x W^T + ((x A_s^T) B_s)   for each row, s = that row's slot; the r-wide middle in fp32

Which slot each row uses is set once per forward by the engine (`rows_use`), not passed through
transformers' forward signature: the model's own forward stays untouched. The grouping of rows by
slot is computed once per step there, and read by all (layers x 7) wrapped linears.

How the adapters' part is computed is a choice between equivalent arithmetics (`KERNELS`); `auto`
picks per forward from what `bench/lora_kernels.py` measured (docs/benchmarks.md has the numbers):

    grouped    for each adapter in the batch: its rows' x, times A_s, times B_s, added to their rows
    masked     every row through the span of slots in use at once (x A_lo..hi: adjacent slots are one block
               of A, so the span is a view, no copy), the columns of the row's other slots zeroed, times B_lo..hi
    gathered   each row's own A and B gathered into a (rows, in, R) batch and multiplied (vLLM's CPU path)
    segmented  rows sorted by slot, then one grouped product through the A slots and one through the B
               slots (torch's grouped_mm: each segment of rows times its own slot, no copy of any weight)
    fused      one native call per layer does every row's update (serve/native_lora.cpp), where it built

The base rows are never touched by any of them (grouped skips slot 0; the others multiply by slot 0's
zeros): a base request batched next to adapter requests gets exactly the base's answer (vLLM PR #48421
is the bug where it did not).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LoraKernel = Literal["auto", "grouped", "masked", "gathered", "segmented", "fused"]
KERNELS: tuple[str, ...] = ("grouped", "masked", "gathered", "segmented")  # torch operators only
# auto: a decode step (one token per row) is `fused` where the native update built; a prompt pass, or a decode step
# without it, is `grouped` when one adapter serves every row (a plain x A B, no sorting), else `segmented`. On a
# 2-core AMD EPYC (Zen 4) they cost the least in the engine's own decode steps (8 and 32 rows; 1 adapter, 8, 8 with
# base rows: bench/engine_step.py) and per layer (bench/lora_kernels.py); the tables are in docs/benchmarks.md.


@dataclass(frozen=True)
class RowSlots:
    """Which adapter slot each row of the current forward uses; grouped once for all layers."""

    slots: torch.Tensor  # (B,) long; 0 = the base model
    groups: tuple[tuple[int, torch.Tensor | None], ...]  # (slot, its rows) per adapter slot in use; None: all rows
    kernel: LoraKernel
    order: torch.Tensor | None  # the rows sorted by slot (segmented); None: they already are
    inverse: torch.Tensor | None  # where each sorted row goes back to
    span: tuple[int, int]  # the lowest and highest adapter slot in use (masked); (0, -1) when none is
    used: frozenset[int]  # the adapter slots in use (0, the base, is never one)
    native: ModuleType | None = None  # serve/native_lora.py's module, where it built (fused)
    _offsets: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    _keep: dict[int, torch.Tensor | None] = field(default_factory=dict, compare=False, repr=False)
    _per_token: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, slots: list[int], kernel: LoraKernel = "auto", native: ModuleType | None = None) -> RowSlots:
        tensor = torch.tensor(slots, dtype=torch.long)
        used = sorted(set(slots) - {0})
        if len(used) == 1 and 0 not in slots:
            groups: tuple[tuple[int, torch.Tensor | None], ...] = ((used[0], None),)
        else:
            groups = tuple((s, (tensor == s).nonzero().squeeze(1)) for s in used)
        order = inverse = None
        if any(a > b for a, b in zip(slots, slots[1:])):
            order = torch.argsort(tensor, stable=True)
            inverse = torch.argsort(order)
        span = (used[0], used[-1]) if used else (0, -1)
        if kernel == "fused" and native is None:
            raise ValueError("lora_kernel fused needs the native update (serve/native_lora.load())")
        return cls(tensor, groups, kernel, order, inverse, span, frozenset(used), native)

    def keep(self, rank: int) -> torch.Tensor | None:
        """(B, 1, span width) fp32: 1 on the columns of each row's own slot, else 0 (masked); None when one
        adapter serves every row (nothing to zero). Once per forward, then read by every layer."""
        if rank not in self._keep:
            lo, hi = self.span
            if lo == hi and 0 not in self.slots:
                self._keep[rank] = None
            else:
                keep = torch.zeros(len(self.slots), hi - lo + 2, rank)  # column 0: the base rows' (dropped below)
                keep[torch.arange(len(self.slots)), torch.where(self.slots > 0, self.slots - lo + 1, 0)] = 1.0
                self._keep[rank] = keep[:, 1:].reshape(len(self.slots), 1, -1)
        return self._keep[rank]

    def per_token(self, tokens: int) -> torch.Tensor:
        """(rows x tokens,) each row's slot once per token of it (fused, on a prompt pass). Once per forward."""
        if tokens == 1:
            return self.slots
        if tokens not in self._per_token:
            self._per_token[tokens] = self.slots.repeat_interleave(tokens)
        return self._per_token[tokens]

    def offsets(self, n_slots: int, tokens: int) -> torch.Tensor:
        """(n_slots,) int32: where each slot's segment of the sorted (rows x tokens) ends (grouped_mm's `offs`)."""
        key = (n_slots, tokens)
        if key not in self._offsets:  # once per forward, then read by every layer
            counts = torch.bincount(self.slots, minlength=n_slots) * tokens
            self._offsets[key] = torch.cumsum(counts, 0).to(torch.int32)
        return self._offsets[key]


_ROWS: contextvars.ContextVar[RowSlots | None] = contextvars.ContextVar("tunelab_lora_rows", default=None)


@contextlib.contextmanager
def rows_use(rows: RowSlots | None) -> Iterator[None]:
    """Within this block, row i of every forward pass uses adapter slot `rows.slots[i]`."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


class MultiLoraLinear(nn.Module):
    """A base linear layer plus a table of adapter slots; see the module docstring for the layout."""

    def __init__(self, base: nn.Linear, slots: int, rank: int) -> None:
        super().__init__()
        self.base = base
        in_features, out_features = base.in_features, base.out_features
        # Buffers, not parameters: never trained here, and not part of any state dict a user saves.
        self.register_buffer("lora_a", torch.zeros(slots, rank, in_features), persistent=False)  # (S, R, in)
        self.register_buffer("lora_b", torch.zeros(slots, rank, out_features), persistent=False)  # (S, R, out)
        self.filled: set[int] = set()  # slots whose adapter targets this layer (others are zeros)

    def write_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None) -> None:
        """Put one adapter's (r, in) A and (out, r) B (scale already folded in) into `slot`; None clears it."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.filled.discard(slot)
        if a is None or b_scaled is None:
            return
        r = a.shape[0]
        self.lora_a[slot, :r] = a.float()
        self.lora_b[slot, :r] = b_scaled.t().float()
        self.filled.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = _ROWS.get()
        if rows is None or self.filled.isdisjoint(rows.used):
            return y
        kernel = rows.kernel
        if kernel == "auto" and rows.native is not None and x.shape[1] == 1:
            kernel = "fused"
        if kernel == "fused" and _native_takes(x, y):
            rows.native.lora_add_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).contiguous(), self.lora_a,
                                  self.lora_b, rows.per_token(x.shape[1]))
            return y
        if kernel in ("auto", "fused"):  # fused: activations the native update does not take go the torch way
            kernel = "grouped" if len(rows.groups) == 1 and rows.groups[0][1] is None else "segmented"
        with torch.autocast(x.device.type, enabled=False):  # the r-wide middle in fp32, whatever the base computes in
            delta = _DELTA[kernel](x.float(), self.lora_a, self.lora_b, rows)
        # y is this call's own output, so it is updated in place: one rounding to its dtype (bf16 or fp32)
        if isinstance(delta, list):
            for idx, part in delta:
                if idx is None:
                    y.add_(part)
                else:
                    y.index_add_(0, idx, part.to(y.dtype))
            return y
        return y.add_(delta)


def _native_takes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The native update's inputs: CPU tensors, x and y in one dtype of fp32 or bf16, y laid out plainly."""
    return (x.device.type == "cpu" and x.dtype == y.dtype and y.dtype in (torch.float32, torch.bfloat16)
            and y.is_contiguous())


def _grouped(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowSlots):
    """[(rows, (b, T, out) delta)] for each adapter slot in the batch."""
    parts = []
    for slot, idx in rows.groups:
        xs = x if idx is None else x.index_select(0, idx)  # (b, T, in)
        parts.append((idx, F.linear(xs, a[slot]) @ b[slot]))
    return parts


def _masked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowSlots) -> torch.Tensor:
    """(B, T, out): x through the A of every slot in rows.span at once, the columns of each row's other slots
    zeroed, through those slots' B. The span's slots are adjacent rows of A and of B: views, no copy."""
    _, rank, in_features = a.shape
    lo, hi = rows.span
    columns = slice(lo * rank, (hi + 1) * rank)
    h = F.linear(x, a.reshape(-1, in_features)[columns])  # (B, T, span * R)
    keep = rows.keep(rank)
    if keep is not None:
        h.mul_(keep)
    return h @ b.reshape(-1, b.shape[2])[columns]


def _gathered(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowSlots) -> torch.Tensor:
    """(B, T, out): each row's own (in, R) and (R, out) gathered, then batched matmuls."""
    a_rows = a.transpose(1, 2)[rows.slots]  # (B, in, R)
    return torch.bmm(torch.bmm(x, a_rows), b[rows.slots])


def _segmented(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowSlots) -> torch.Tensor:
    """(B, T, out): the rows sorted by slot, each segment through its own slot's A, then its own B."""
    batch, tokens, in_features = x.shape
    if not all(n % 4 == 0 for n in (in_features, a.shape[1], b.shape[2])):  # grouped_mm wants 16-byte strides
        return _grouped(x, a, b, rows)
    xs = x if rows.order is None else x.index_select(0, rows.order)
    offs = rows.offsets(a.shape[0], tokens)
    h = F.grouped_mm(xs.reshape(batch * tokens, in_features), a.transpose(1, 2), offs=offs)
    delta = F.grouped_mm(h, b, offs=offs).reshape(batch, tokens, -1)  # (B, T, out), sorted
    return delta if rows.inverse is None else delta.index_select(0, rows.inverse)


_DELTA = {"grouped": _grouped, "masked": _masked, "gathered": _gathered, "segmented": _segmented}


def wrap_linears(model: nn.Module, module_names: list[str], slots: int, rank: int) -> dict[str, MultiLoraLinear]:
    """Replace each named nn.Linear of `model` by a MultiLoraLinear around it; name -> wrapper."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for name in module_names:
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear), f"{name} is {type(base).__name__}, not nn.Linear"
        wrapper = MultiLoraLinear(base, slots, rank).to(base.weight.device)
        model.set_submodule(name, wrapper)
        wrapped[name] = wrapper
    return wrapped
