"""What cannot be served correctly is refused when it is first named, with the reason; never served wrongly."""

from __future__ import annotations

import json
import shutil

import pytest

from tunelab.errors import TunelabError
from tunelab.rundir import RunDir
from tunelab.serve.adapters import check_adapter


def _copy_with(run, tmp_path, edit_config=None, edit_data=None):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    if edit_config:
        path = folder / "adapter" / "adapter_config.json"
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    if edit_data:
        path = folder / "data.json"
        path.write_text(json.dumps(edit_data(json.loads(path.read_text()))))
    RunDir(folder).write_manifest()
    return folder


def _fingerprint(run) -> str:
    return RunDir(run).data().base_model.weights


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda c: {**c, "use_dora": True}, "DoRA"),
    (lambda c: {**c, "modules_to_save": ["lm_head"]}, "lm_head"),
    (lambda c: {**c, "r": 64}, "rank 64 is above the server's maximum 16"),
    (lambda c: {**c, "rank_pattern": {"q_proj": 2}}, "rank_pattern"),
])
def test_adapters_the_slots_cannot_hold_are_refused(adapter_runs, tmp_path, edit, fragment):
    folder = _copy_with(adapter_runs["r4"], tmp_path, edit_config=edit)
    with pytest.raises(TunelabError, match=fragment):
        check_adapter(folder, _fingerprint(folder), max_rank=16, where="test")


def test_an_adapter_of_another_base_is_refused(adapter_runs):
    with pytest.raises(TunelabError, match="trained on other base weights"):
        check_adapter(adapter_runs["r4"], "0123456789abcdef", max_rank=16, where="test")


def test_an_unfinished_run_is_refused(adapter_runs, tmp_path):
    folder = _copy_with(adapter_runs["r4"], tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(TunelabError, match="not a finished run"):
        check_adapter(folder, _fingerprint(folder), max_rank=16, where="test")


def test_tensors_that_match_no_layer_are_refused(adapter_runs, tmp_path, tiny_model_dir):
    """vLLM #34186: an adapter whose target modules match nothing served silently as the base."""
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.serve.adapters import read_lora
    from tunelab.serve.multi_lora import MultiLoraLinear

    folder = _copy_with(adapter_runs["r4"], tmp_path)
    path = folder / "adapter" / "adapter_model.safetensors"
    renamed = {k.replace("self_attn", "attention"): v for k, v in load_file(path).items()}
    save_file(renamed, str(path))
    layers = {"model.layers.0.self_attn.q_proj": MultiLoraLinear(torch.nn.Linear(16, 16), 2, 8)}
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    with pytest.raises(TunelabError, match="match no linear layer"):
        read_lora(folder, layers, config, where="test")


def test_a_changed_chat_template_is_refused_through_the_catalog(adapter_runs, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from tunelab.serve.catalog import Catalog, NotServable

    folder = _copy_with(adapter_runs["r4"], tmp_path)
    tokenizer_config = folder / "tokenizer" / "chat_template.jinja"
    if tokenizer_config.exists():
        tokenizer_config.write_text(tokenizer_config.read_text().replace("<|im_start|>", "<|im_begin|>"))
    else:  # older transformers keep it in tokenizer_config.json
        path = folder / "tokenizer" / "tokenizer_config.json"
        data = json.loads(path.read_text())
        data["chat_template"] = data["chat_template"].replace("<|im_start|>", "<|im_begin|>")
        path.write_text(json.dumps(data))
    RunDir(folder).write_manifest()
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    catalog = Catalog(str(tiny_model_dir), base_tokenizer, _fingerprint(folder), 16, [str(folder)], None)
    with pytest.raises(NotServable, match="chat template"):
        catalog.resolve(str(folder))
