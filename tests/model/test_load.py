"""tunelab.model.load: resolving a model spec, loading, attaching LoRA."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import DEFAULT_MODEL, LoraConfig
from tunelab.errors import TunelabError
from tunelab.io import tunelab_home
from tunelab.model.load import attach_lora, load_model, resolve_model, weights_fingerprint


def test_unknown_model_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError) as info:
        resolve_model("no-such-model")
    what = info.value.what
    assert "no-such-model" in what
    assert DEFAULT_MODEL in what and ".gguf" in what and "config.json" in what
    assert str(tmp_path / "no-such-model") in what


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="unknown model"):
        resolve_model(str(tmp_path / "empty"))


def test_hf_folder_resolves_and_loads(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.path == tiny_model_dir.resolve()
    model, tokenizer = load_model(resolved)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template
    fp = weights_fingerprint(resolved)
    assert len(fp) == 16 and fp == weights_fingerprint(resolved)


def test_tunelab_home_is_isolated_for_tests(tmp_path_factory):
    # conftest points TUNELAB_HOME at a temp dir: tests never write to ~/.cache.
    assert str(tunelab_home()).startswith(str(tmp_path_factory.getbasetemp()))


def test_attach_lora_freezes_base_and_starts_as_identity(tiny_model_dir):
    model, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    ids = torch.tensor([tokenizer("hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    peft_model = attach_lora(model, LoraConfig(rank=2, alpha=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if p.requires_grad)
    # every linear layer of the blocks is adapted (q, k, v, o, gate, up, down), not the head
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        after = peft_model(ids).logits
    torch.testing.assert_close(after, before)  # LoRA B starts at zero


@pytest.mark.parametrize("use_dora", [False, True])
def test_attach_lora_skips_the_input_cast(tiny_model_dir, use_dora):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tunelab.model.kernels.dora import RowNormDoraLayer

    model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16)
    model = attach_lora(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    magnitudes = [m for m in model.modules() if isinstance(m, RowNormDoraLayer)]
    assert len(magnitudes) == (len(layers) if use_dora else 0)  # DoRA gets the dtype-free norm


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_builds_tunelab_layers_that_save_and_reload_as_peft_s(tiny_model_dir, tmp_path, use_dora):
    """attach_lora and load_adapter have PEFT build tunelab's LoRA classes through its custom-module mapping (no
    class swapping); adapter_config.json stays PEFT's, and the reloaded model answers the same."""
    import json

    from peft.tuners.lora.layer import Linear as LoraLinear

    from tunelab.model.kernels.dora import RowNormDoraLayer
    from tunelab.model.kernels.fused_lora import FusedLoraLinear
    from tunelab.model.load import load_adapter

    resolved = resolve_model(str(tiny_model_dir))
    torch.manual_seed(0)
    model = attach_lora(load_model(resolved)[0], LoraConfig(rank=4, alpha=8, use_dora=use_dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    assert all("default" in m.lora_magnitude_vector and isinstance(m.lora_magnitude_vector["default"], RowNormDoraLayer)
               for m in layers) == use_dora
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "custom" not in json.dumps(saved).lower() and saved["use_dora"] == use_dora
    again = load_adapter(load_model(resolved)[0], tmp_path)
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_peft_dora_layers_keep_the_input_cast(tiny_model_dir):
    """PEFT's own DoRA norm is computed in the input's dtype: a layer still holding it keeps the cast."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tunelab.model.kernels.fused_lora import _input_dtype_free

    model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16)
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules="all-linear", use_dora=True))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(type(m.lora_magnitude_vector["default"]) is DoraLinearLayer for m in layers)
    assert not any(_input_dtype_free(m) for m in layers)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_inputs_uncast_is_bitwise_the_same_under_bf16_autocast(tiny_model_dir, use_dora):
    """PEFT's bf16 -> fp32 cast of each adapted layer's input (undone by autocast) is skipped: nothing changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tunelab.model.precision import choose_precision

    precision = choose_precision("bf16")
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for cast in (True, False):
        torch.manual_seed(0)
        model, _ = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16)
        model = attach_lora(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora))
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = cast
        for name, p in model.named_parameters():  # lora_B starts at 0: give it values so the adapter path counts
            if "lora_B" in name:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        with precision.autocast():
            logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (cast_logits, cast_grads), (logits, grads) = results
    assert torch.equal(logits, cast_logits)
    assert grads.keys() == cast_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], cast_grads[name]), name


def test_a_model_that_caps_its_logits_is_refused_at_load(tiny_model_dir, tmp_path):
    """tunelab applies the LM head itself; a soft-capping head (Gemma 2) would train on the wrong logits.
    This was an `assert` that `python -O` removed; now it is an error that says what to do."""
    import json
    import shutil

    from tunelab.errors import TunelabError

    folder = shutil.copytree(tiny_model_dir, tmp_path / "capped")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(TunelabError, match=r"capped: LlamaForCausalLM caps its logits \(final_logit_softcapping=30.0\)"
                                           r".*fix: use a base model without logit soft-capping"):
        load_model(resolve_model(str(folder)))


def test_top_layers_adapts_only_the_last_layers_and_backward_stops_below_them(tiny_model_dir, tmp_path):
    from tunelab.model.load import decoder_layers, load_adapter

    resolved = resolve_model(str(tiny_model_dir))
    model = load_model(resolved)[0]
    count = len(decoder_layers(model))
    assert count >= 2
    peft_model = attach_lora(model, LoraConfig(rank=2, alpha=4, top_layers=1))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapted == {count - 1}
    kinds = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear, named
    # Nothing below the adapted layer needs a gradient, so autograd records no graph there: the lowest layer's
    # output carries no grad_fn, the top layer's does.
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(decoder_layers(peft_model))]
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids).logits.sum().backward()
    for hook in hooks:
        hook.remove()
    first = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    last = outputs[count - 1][0] if isinstance(outputs[count - 1], tuple) else outputs[count - 1]
    assert first.grad_fn is None and last.grad_fn is not None
    peft_model.save_pretrained(tmp_path)
    again = load_adapter(load_model(resolved)[0], tmp_path)
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)


def test_top_layers_beyond_the_model_or_with_a_regex_is_a_clear_error(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    with pytest.raises(TunelabError, match="lora.top_layers is 99, but the model has"):
        attach_lora(load_model(resolved)[0], LoraConfig(top_layers=99))
    with pytest.raises(TunelabError, match="regular expression"):
        attach_lora(load_model(resolved)[0], LoraConfig(top_layers=1, target_modules=".*q_proj"))
