"""The multi-adapter linear layer: every kernel equals each row's own x W^T + s (x A^T) B^T, and base rows
are the base layer's output, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tunelab.serve.multi_lora import KERNELS, MultiLoraLinear, RowSlots, rows_use


def _layer(ranks: dict[int, int], seed: int = 0, out: int = 16) -> tuple[MultiLoraLinear,
                                                                         dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """A 12 -> `out` linear with adapters in the given slots (slot -> rank); returns it and each slot's (A, B).
    (An `out` that is not a multiple of 4 makes `segmented` fall back to `grouped`: grouped_mm's alignment.)"""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(12, out)
    layer = MultiLoraLinear(base, slots=4, rank=8)
    weights = {}
    for slot, rank in ranks.items():
        a, b = torch.randn(rank, 12, generator=gen), torch.randn(out, rank, generator=gen)
        layer.write_slot(slot, a, b)
        weights[slot] = (a, b)
    return layer, weights


@pytest.mark.parametrize("slots", [[0, 2, 1, 0, 3, 2, 2], [3, 0, 2, 3], [0, 3, 0, 3]],
                         ids=["all slots and base rows", "a span from slot 2", "one adapter and base rows"])
@pytest.mark.parametrize("out", [16, 10])
@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_each_row_gets_its_own_adapter(kernel, out, slots):
    layer, weights = _layer({1: 4, 2: 8, 3: 2}, out=out)
    x = torch.randn(len(slots), 5, 12)  # (B, T, in)
    with rows_use(RowSlots.of(slots, kernel)):
        y = layer(x)
    for row, slot in enumerate(slots):
        expected = layer.base(x[row])
        if slot:
            a, b = weights[slot]
            expected = expected + (x[row] @ a.t()) @ b.t()
        if slot == 0:
            assert torch.equal(y[row], expected), "a base row changed"
        else:
            torch.testing.assert_close(y[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_one_adapter_for_every_row_and_outside_any_batch(kernel):
    layer, (weights) = _layer({2: 8})
    x = torch.randn(3, 2, 12)
    a, b = weights[2]
    with rows_use(RowSlots.of([2, 2, 2], kernel)):
        torch.testing.assert_close(layer(x), layer.base(x) + (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), layer.base(x))  # no rows_use: the base layer alone


def test_a_cleared_slot_adds_nothing_and_a_rewritten_one_holds_only_the_new_adapter():
    layer, _ = _layer({1: 8})
    layer.write_slot(1, None, None)
    x = torch.randn(2, 1, 12)
    with rows_use(RowSlots.of([1, 1])):
        assert torch.equal(layer(x), layer.base(x))
    a, b = torch.randn(2, 12), torch.randn(16, 2)  # a smaller rank where rank 8 was: no leftover columns
    layer.write_slot(1, torch.randn(8, 12), torch.randn(16, 8))
    layer.write_slot(1, a, b)
    with rows_use(RowSlots.of([1, 1])):
        torch.testing.assert_close(layer(x), layer.base(x) + (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
