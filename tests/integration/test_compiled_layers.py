"""train.compile_layers (model/kernels/compiled.py): whole decoder layers compiled train like the eager ones, and only when asked or worth it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import classification_rows, make_run_config, run_log, write_csv
from tunelab.data.pack import collate_packed
from tunelab.model.kernels.compiled import eager_layers, restore_eager
from tunelab.model.scoring import trained_logits, validation_loss


def _setup(make_config, csv: Path, **train):
    from tunelab.training.setup import setup

    with run_log() as lines:
        s = setup(make_config(csv, train=train))
    return s, "\n".join(lines)


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits, targets = trained_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _compiled(layer: torch.nn.Module) -> bool:
    return getattr(layer, "_compiled_call_impl", None) is not None


@pytest.fixture(scope="module")
def compiled_run(tiny_model_dir, tmp_path_factory):
    """A LoRA SFT setup (fp32) with compiled layers, and the batches it was checked on: one compile for the module."""
    from tunelab.training.setup import setup

    tmp = tmp_path_factory.mktemp("compiled_layers")
    # Texts three times as long and a short system prompt, as the demo's rows: the shared prefix is no longer
    # than the rest, so it rides in the batch (`kernels.prefix._body_with_prefix_in_batch`) as a tensor argument.
    csv = write_csv(tmp / "intents.csv", [(f"{text}; {text}; {text}", label) for text, label in classification_rows()])
    cfg = make_run_config(tiny_model_dir, csv, tmp / "runs", data={"system_prompt": "Classify."},
                          train={"compile_layers": True})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with run_log() as lines:
        s = setup(cfg)
    return s, "\n".join(lines)


def test_setup_compiles_every_layer_and_says_so(compiled_run):
    s, log = compiled_run
    layers = s.model.get_base_model().model.layers
    assert all(_compiled(layer) for layer in layers)
    assert f"layers: torch.compile fuses each of the {len(layers)} decoder layers" in log
    assert "compile_layers" in s.timings
    assert all(p.grad is None for p in s.model.parameters())  # the compile's probe step left no gradient


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_layers_give_the_eager_loss_and_gradients(compiled_run, packed):
    s, _ = compiled_run
    micro = s.stream[1]
    batch = collate_packed(micro, s.tokenizer.pad_token_id) if packed else s.collate(micro)
    p, t = batch.shared_prefix, batch.input_ids.shape[1]
    assert 0 < p <= t - p, "the test needs the in-batch shared prefix (a tensor argument of every layer)"
    eager = copy.deepcopy(s.model)
    restore_eager(eager)
    assert not any(_compiled(m) for m in eager.modules())
    loss_c, grads_c = _loss_and_grads(s.model, batch)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:  # fp32; Inductor's fused loops sum in another order: rounding-level differences
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # One graph serves every batch: the shared prefix reaches the attention as a tensor argument, not through a
    # context variable, which would break each layer's graph in two.
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_validation_runs_the_layers_eager(compiled_run):
    s, _ = compiled_run
    layers = s.model.get_base_model().model.layers
    calls = []
    held = [layer._compiled_call_impl for layer in layers]
    for layer, compiled in zip(layers, held):  # count the calls that go through each compiled graph
        layer._compiled_call_impl = lambda *a, _c=compiled, **k: calls.append(1) or _c(*a, **k)
    try:
        assert validation_loss(s.model, s.val_batches, s.precision) > 0
        assert calls == []  # no forward without gradients compiled a graph of its own
        with eager_layers(s.model):
            assert not any(_compiled(layer) for layer in layers)
        assert all(_compiled(layer) for layer in layers)  # compiled again after it
        _loss_and_grads(s.model, s.collate(s.stream[1]))
        assert len(calls) == len(layers)  # a training forward does go through them
    finally:
        for layer, compiled in zip(layers, held):
            layer._compiled_call_impl = compiled


def test_auto_leaves_short_runs_eager_and_the_log_says_why(make_config, classification_csv: Path):
    s, log = _setup(make_config, classification_csv)  # compile_layers: auto, a few hundred tokens
    assert not any(_compiled(m) for m in s.model.modules())
    assert "layers: eager (auto:" in log and "under 300,000" in log
    s, log = _setup(make_config, classification_csv, compile_layers=False)
    assert "layers: eager (off in the config)" in log
    s, log = _setup(make_config, classification_csv, compile_layers=True, compile_kernels=False)
    assert "layers: eager (torch.compile is off or unavailable" in log and not any(_compiled(m) for m in s.model.modules())


def test_restore_eager_undoes_compiled_layers(compiled_run):
    s, _ = compiled_run
    model = copy.deepcopy(s.model)
    restore_eager(model)
    assert not any(_compiled(m) for m in model.modules())


@pytest.mark.parametrize("quantize", [
    "int8",
    pytest.param("nf4", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                                 reason="nf4 needs bitsandbytes")),
])
def test_compiled_layers_over_a_quantized_base_give_the_eager_loss_and_gradients(tiny_model_dir, tmp_path, quantize):
    """int8 (tunelab's custom operators) and QLoRA (bitsandbytes' 4-bit matmul): the quantized product and the
    fused adapter inside each layer's graph, without a break."""
    from tunelab.training.setup import setup

    csv = write_csv(tmp_path / "intents.csv", classification_rows())
    cfg = make_run_config(tiny_model_dir, csv, tmp_path / "runs", lora={"quantize_base": quantize},
                          train={"compile_layers": True})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with run_log() as lines:
        s = setup(cfg)
    layers = s.model.get_base_model().model.layers
    assert all(_compiled(layer) for layer in layers), "\n".join(lines)
    batch = s.collate(s.stream[1])
    eager = copy.deepcopy(s.model)
    restore_eager(eager)
    loss_c, grads_c = _loss_and_grads(s.model, batch)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
