"""Packed frozen linears (serving): the same products as nn.Linear, for any number of rows."""

from __future__ import annotations

import pytest
import torch

from tunelab.model.kernels.packed import PackedLinear, pack_linears, packing_speedup

AVAILABLE = packing_speedup(torch.float32, rows=2, k=16, n=16, repeats=1) is not None
needs_onednn = pytest.mark.skipif(not AVAILABLE, reason="this torch has no oneDNN packed linear")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_computes_the_linear_for_any_rows(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    packed = PackedLinear(linear, rows_hint=8)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    with torch.no_grad():
        for shape in [(1, 64), (5, 1, 64), (8, 1, 64), (3, 7, 64), (40, 64)]:
            x = torch.randn(shape).to(dtype)
            torch.testing.assert_close(packed(x).float(), linear(x).float(), **tolerance)


@needs_onednn
def test_a_packed_model_gives_the_plain_models_logits(tiny_loaded):
    import copy

    model, _ = tiny_loaded
    packed = copy.deepcopy(model)
    names = [n for n, m in packed.named_modules() if isinstance(m, torch.nn.Linear)]
    pack_linears(packed, names, rows_hint=4)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_speedup_is_a_ratio_or_none_and_draws_nothing_from_the_global_rng():
    state = torch.random.get_rng_state()
    speedup = packing_speedup(torch.float32, rows=2, k=32, n=32, repeats=3)
    assert speedup is None or speedup > 0
    assert torch.equal(state, torch.random.get_rng_state())
