"""The multi-adapter linear layer: every kernel equals each row's own x W^T + s (x A^T) B^T, and base rows
are the base layer's output, bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from tunelab.serve import native_lora
from tunelab.serve.multi_lora import KERNELS, MultiLoraLinear, RowSlots, rows_use


@pytest.fixture(scope="module")
def native():
    """The native LoRA update, built once (minutes the first time on a machine, then cached); a machine without a C++
    compiler skips its tests, and one whose build fails fails them."""
    module = native_lora.load()
    if module is None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler to build the native LoRA update")
        pytest.fail("the native LoRA update did not build (the log says why)")
    return module


def _rows(slots: list[int], kernel: str, request: pytest.FixtureRequest) -> RowSlots:
    return RowSlots.of(slots, kernel, request.getfixturevalue("native") if kernel in ("fused", "auto") else None)


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
@pytest.mark.parametrize("tokens", [5, 1], ids=["prompt", "decode"])
@pytest.mark.parametrize("kernel", [*KERNELS, "fused", "auto"])
def test_each_row_gets_its_own_adapter(kernel, out, slots, tokens, request):
    layer, weights = _layer({1: 4, 2: 8, 3: 2}, out=out)
    x = torch.randn(len(slots), tokens, 12)  # (B, T, in)
    with rows_use(_rows(slots, kernel, request)):
        y = layer(x)
    base = layer.base(x)  # the same batched product (one row alone may be summed in another order)
    for row, slot in enumerate(slots):
        expected = base[row]
        if slot:
            a, b = weights[slot]
            expected = expected + (x[row] @ a.t()) @ b.t()
        if slot == 0:
            assert torch.equal(y[row], expected), "a base row changed"
        else:
            torch.testing.assert_close(y[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [*KERNELS, "fused", "auto"])
def test_one_adapter_for_every_row_and_outside_any_batch(kernel, request):
    layer, (weights) = _layer({2: 8})
    x = torch.randn(3, 2, 12)
    a, b = weights[2]
    with rows_use(_rows([2, 2, 2], kernel, request)):
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


def test_the_native_update_in_bf16_rounds_once_as_the_torch_operators_do(native):
    """bf16 weights and activations (how a server on an AVX512-BF16 CPU runs): the middle and the sums in fp32, the
    output rounded once; base rows untouched. Against the torch operators' result on the same layer."""
    layer, _ = _layer({1: 8, 3: 4}, out=16)
    layer.base = layer.base.to(torch.bfloat16)
    slots = [1, 0, 3, 1, 0, 3, 3, 1]
    x = torch.randn(len(slots), 1, 12).to(torch.bfloat16)
    with torch.no_grad():
        with rows_use(RowSlots.of(slots, "fused", native)):
            fused = layer(x)
        with rows_use(RowSlots.of(slots, "segmented")):
            torch_ops = layer(x)
        base = layer.base(x)
    assert fused.dtype == torch.bfloat16
    for row, slot in enumerate(slots):
        if slot == 0:
            assert torch.equal(fused[row], base[row])
    assert (fused.float() - torch_ops.float()).abs().max() <= 1e-2 * torch_ops.float().abs().max()
    assert not torch.equal(fused, base)  # the adapters did add something


def test_the_native_update_refuses_what_it_cannot_compute(native):
    y, x = torch.zeros(2, 4), torch.zeros(2, 3)
    a, b = torch.zeros(2, 2, 3), torch.zeros(2, 2, 4)
    with pytest.raises(RuntimeError, match="slot out of range"):
        native.lora_add_(y, x, a, b, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="sizes do not match"):
        native.lora_add_(y, torch.zeros(2, 5), a, b, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="one dtype"):
        native.lora_add_(y, x.double(), a, b, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs the native update"):
        RowSlots.of([1], "fused", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_update_equals_the_plain_arithmetic_at_odd_sizes(native, dtype):
    """A slot rank that is not a multiple of the kernel's four-at-a-time shrink, odd widths, a smaller rank padded
    with zeros, and every row's own slot: each row is y + (x A_s^T) B_s, base rows untouched."""
    gen = torch.Generator().manual_seed(3)
    rows, fan_in, fan_out, rank = 6, 13, 11, 7
    a = torch.zeros(4, rank, fan_in)
    b = torch.zeros(4, rank, fan_out)
    for slot, r in ((1, 7), (2, 3), (3, 5)):
        a[slot, :r] = torch.randn(r, fan_in, generator=gen)
        b[slot, :r] = torch.randn(r, fan_out, generator=gen)
    x = torch.randn(rows, fan_in, generator=gen).to(dtype)
    y = torch.randn(rows, fan_out, generator=gen).to(dtype)
    slots = torch.tensor([3, 0, 1, 2, 1, 0])
    expected = y.float().clone()
    for n, s in enumerate(slots.tolist()):
        expected[n] += (x[n].float() @ a[s].t()) @ b[s]
    got = y.clone()
    native.lora_add_(got, x, a, b, slots)
    assert torch.equal(got[1], y[1]) and torch.equal(got[5], y[5])
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), **tolerance)
