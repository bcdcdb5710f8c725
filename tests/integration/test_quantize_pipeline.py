"""After the models.py / sft.py integration: `lora.quantize_base` through the real recipe."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import run_log
from tunelab.errors import TunelabError
from tunelab.training.recipe import train

NF4 = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                         reason="nf4 needs bitsandbytes: pip install 'tunelab[quant]'")


@pytest.mark.parametrize("method", ["int8", pytest.param("nf4", marks=NF4)])
def test_recipe_trains_over_a_quantized_base(method, classification_csv, make_config):
    cfg = make_config(classification_csv, lora={"quantize_base": method},
                      train={"epochs": 4, "learning_rate": 1e-2, "eval_every": 2})  # validation between steps
    with run_log() as lines:
        result = train(cfg)
    log = "\n".join(lines)
    assert f"quantized base: {method}:" in log and "14 linear layers" in log
    steps = [json.loads(x) for x in (result.run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(s["loss"] for s in steps[-3:]) < sum(s["loss"] for s in steps[:3])  # it learns
    up = result.model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    assert up.weight.dtype == (torch.int8 if method == "int8" else torch.uint8)


def test_recipe_refuses_int8_with_dora_before_loading(classification_csv, make_config):
    cfg = make_config(classification_csv, lora={"quantize_base": "int8", "use_dora": True})
    with pytest.raises(TunelabError, match="DoRA cannot read int8"):
        train(cfg)


def test_load_run_rebuilds_the_quantized_base(classification_csv, make_config):
    from tunelab.rundir import load_run

    cfg = make_config(classification_csv, lora={"quantize_base": "int8"}, train={"epochs": 2, "learning_rate": 1e-2})
    result = train(cfg)
    result.run.write_manifest({})  # load_run wants a finished run
    reloaded, tokenizer, _ = load_run(result.run.path)
    ids = torch.tensor([tokenizer("where is my card", add_special_tokens=False)["input_ids"]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=1e-5)
