"""tunelab.model.kernels: `model.kernels: reference` is plain PEFT and transformers, and tunelab's kernels
compute what it computes: the same loss and gradients, the same greedy answers, the same adapter files."""

from __future__ import annotations

import re

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from helpers import REPO, classification_rows
from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.evaluation.generate import generate
from tunelab.model.kernels import attention
from tunelab.model.kernels.compiled import CompiledGatedMlp, CompiledNorm
from tunelab.model.kernels.fused_lora import FusedLoraLinear
from tunelab.model.load import attach_lora, load_adapter, load_model, resolve_model
from tunelab.model.precision import choose_precision
from tunelab.training.setup import setup
from tunelab.training.step import backward_on

METHODS = {"lora": {}, "dora": {"use_dora": True}, "int8": {"quantize_base": "int8"}}


def _first_step(make_config, csv, kernels: str, lora: dict, packing: bool = False) -> tuple[float, dict]:
    cfg = make_config(csv, lora=lora, train={"packing": packing, "batch_size": 16})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kernels": kernels})})
    s = setup(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0: give it values so the adapter's whole path counts
        for name, p in s.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    s.model.train()
    loss, _, _ = backward_on(s.loss_module, [s.collate(s.stream[0])], s.precision)
    return loss, {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}, s


@pytest.mark.parametrize("method", list(METHODS))
def test_tunelab_kernels_give_the_reference_loss_and_gradients(make_config, classification_csv, method):
    ref_loss, ref_grads, ref = _first_step(make_config, classification_csv, "reference", METHODS[method])
    loss, grads, ours = _first_step(make_config, classification_csv, "tunelab", METHODS[method])
    # The reference really is plain: PEFT's layers, transformers' attention, nothing compiled or shared.
    assert ref.model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, (FusedLoraLinear, CompiledNorm, CompiledGatedMlp)) for m in ref.model.modules())
    assert sum(type(m) is LoraLinear for m in ref.model.modules()) > 0
    assert ref.collate(ref.stream[0]).shared_prefix == 0
    # ...and the fast path really is another path.
    assert ours.model.config._attn_implementation == attention.NAME
    assert sum(isinstance(m, FusedLoraLinear) for m in ours.model.modules()) > 0
    assert ours.collate(ours.stream[0]).shared_prefix > 0
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_under_tunelab_kernels_give_the_reference_loss(make_config, classification_csv):
    ref_loss, ref_grads, _ = _first_step(make_config, classification_csv, "reference", {})
    loss, grads, _ = _first_step(make_config, classification_csv, "tunelab", {}, packing=True)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_greedy_answers_and_saved_adapters_are_the_same_either_way(tiny_model_dir, tmp_path):
    from tunelab.config import LoraConfig

    resolved = resolve_model(str(tiny_model_dir))
    torch.manual_seed(0)
    fast, tokenizer = load_model(resolved, kernels="tunelab")
    fast = attach_lora(fast, LoraConfig(rank=4, alpha=8), kernels="tunelab")
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    fast.save_pretrained(tmp_path / "adapter")
    plain = load_adapter(load_model(resolved, kernels="reference")[0], tmp_path / "adapter", kernels="reference")
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    plain.save_pretrained(tmp_path / "again")
    a = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "adapter_model.safetensors").read_bytes()
    prompts = [render_prompt(tokenizer, [Message("user", text)]) for text, _ in classification_rows()[:12]]
    fp32 = choose_precision("fp32")
    runs = [generate(m.eval(), tokenizer, prompts, max_new_tokens=6, batch_size=4, precision=fp32) for m in (fast, plain)]
    assert [g.token_ids for g in runs[0].generations] == [g.token_ids for g in runs[1].generations]


def test_the_kernels_switch_is_a_config_key(make_config, classification_csv):
    cfg = make_config(classification_csv)
    assert cfg.model.kernels == "tunelab"
    from tunelab.config import parse_config
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=r"model.kernels.*'tunelab' or 'reference'"):
        parse_config({"model": {"name": "x", "kernels": "fast"}})


def test_one_place_changes_a_module_s_class():
    """`kernels.swap_class` is the one place; anything else must use PEFT's or torch's extension points."""
    places = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "src").rglob("*.py")
              for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"__class__\s*=(?!=)", line)]
    assert len(places) == 1 and places[0].startswith("src/tunelab/model/kernels/__init__.py:"), places
