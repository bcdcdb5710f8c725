"""DoRA and rsLoRA through the same recipe: loss falls, files are PEFT's, reload is exact."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.rundir import load_run
from tunelab.training.recipe import train


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"use_rslora": True}], ids=["dora", "rslora"])
def test_variant_trains_and_reloads_identically(lora, classification_csv, make_config, tiny_loaded):
    cfg = make_config(classification_csv, lora={"rank": 4, "alpha": 8, **lora},
                      train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2})
    result = train(cfg)
    steps = [json.loads(x) for x in (result.run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(s["loss"] for s in steps[-3:]) < sum(s["loss"] for s in steps[:3])  # it learns

    adapter_cfg = json.loads((result.run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is bool(lora.get("use_dora"))
    assert adapter_cfg["use_rslora"] is bool(lora.get("use_rslora"))
    if lora.get("use_dora"):
        names = [n for n, _ in result.model.named_parameters() if "lora_magnitude_vector" in n]
        assert names, "DoRA adds a magnitude vector per adapted layer"

    result.run.write_manifest({})  # load_run wants a finished run
    reloaded, tokenizer, _ = load_run(result.run.path)
    ids = torch.tensor([tokenizer("where is my card", add_special_tokens=False)["input_ids"]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        base = tiny_loaded[0](input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the model
