"""Every export target on tiny runs: the files written, what export.json records, and the checks passing;
then the method variants (rsLoRA, DoRA, an int8 base, a full fine-tune) and a registry reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

FAST = {"prompts": 3, "new_tokens": 6}  # the checks' prompts and greedy tokens, kept small for test time


def export(run, to: str, path: Path, **options):
    import tunelab as tl

    return tl.export(run, to=to, path=path, **{**FAST, **options})


def names(record) -> dict[str, bool]:
    return {c.name: c.passed for c in record.checks}


def test_hf_folder_is_merged_loads_alone_and_answers_like_base_plus_adapter(export_runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.rundir import load_run

    out = tmp_path / "merged"
    record = export(export_runs["lora"], "hf", out)
    assert names(record) == {"merge": True, "non-vacuity": True, "hf-reload": True, "hf-files": True}
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
            "export.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}  # peft #1381
    saved = json.loads((out / "export.json").read_text())
    assert saved["format"] == "tunelab-export/1" and saved["dtype"] == "float32" and saved["verified"] is True
    assert set(saved["files"]) == files - {"export.json"}
    # Independently of the export's own checks: the folder alone computes what base + adapter computes.
    unmerged, tokenizer, _ = load_run(export_runs["lora"])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("where is my card")["input_ids"]])
    with torch.no_grad():
        assert (merged(ids).logits - unmerged(ids).logits).abs().max() < 1e-4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_hf_folder_in_bfloat16_is_checked_against_its_own_tolerance(export_runs, tmp_path):
    record = export(export_runs["lora"], "hf", tmp_path / "bf16", dtype="bfloat16")
    assert record.dtype == "bfloat16" and all(names(record).values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reload = next(c for c in record.checks if c.name == "hf-reload")
    assert 0 < reload.figures["max_abs_logit_diff"] <= reload.figures["limit"]


def test_f32_gguf_reads_back_through_transformers_as_the_merged_model(export_runs, tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    record = export(export_runs["lora"], "gguf", path, quant="f32")
    assert all(names(record).values()) and {"gguf-logits", "gguf-metadata"} <= set(names(record))
    logits = next(c for c in record.checks if c.name == "gguf-logits")
    assert logits.figures["max_abs_logit_diff"] <= 1e-4 and logits.figures["greedy_agreement"] == 1.0
    reader = gguf.GGUFReader(path)
    tensors = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" in tensors and "token_embd.weight" in tensors
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert record.tokenization.agrees
    assert (tmp_path / "model.export.json").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_q8_0_gguf_quantizes_the_matrices_and_keeps_norms_f32(export_runs, tmp_path):
    record = export(export_runs["lora"], "gguf", tmp_path / "q8.gguf")
    assert record.quant == "q8_0" and all(names(record).values())
    assert record.tensor_types == {"Q8_0": 15, "F32": 5}  # 7 matrices x 2 layers + embeddings; 2 x 2 norms + final
    logits = next(c for c in record.checks if c.name == "gguf-logits")
    assert logits.figures["top1_agreement"] >= logits.figures["min_top1"]


def test_4_bit_gguf_is_measured_and_warned_about(export_runs, tmp_path):
    record = export(export_runs["lora"], "gguf", tmp_path / "q4.gguf", quant="q4_0")
    assert record.tensor_types["Q4_0"] == 14 and record.tensor_types["Q8_0"] == 1  # embeddings stay 8-bit
    assert any("4 bits" in w and "greedy continuations equal the fp32 merge" in w for w in record.warnings)
    figures = next(c for c in record.checks if c.name == "gguf-logits").figures
    assert "greedy_agreement_with_base" in figures


def test_adapter_gguf_holds_lora_pairs_in_llama_cpp_shapes(export_runs, tmp_path):
    import gguf

    path = tmp_path / "lora.gguf"
    record = export(export_runs["lora"], "gguf-adapter", path)
    assert names(record) == {"adapter-delta": True, "gguf-metadata": True, "non-vacuity": True}
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 64]  # ggml ne: a [in, r], b [r, out]
    assert len(tensors) == 2 * 14
    assert any("HF folder" in w for w in record.warnings)  # the tiny base has no GGUF of its own


def test_rslora_alpha_is_stored_times_sqrt_r(export_runs, tmp_path):
    import gguf

    path = tmp_path / "rs.gguf"
    record = export(export_runs["rslora"], "gguf-adapter", path)
    assert all(names(record).values()) and record.source.method == "rslora"
    alpha = gguf.GGUFReader(path).get_field("adapter.lora.alpha").contents()
    assert alpha == pytest.approx(8 * math.sqrt(4))  # llama.cpp's alpha / r == PEFT's 8 / sqrt(4)


def test_ollama_folder_has_a_gguf_and_a_modelfile_from_the_training_template(export_runs, tmp_path):
    out = tmp_path / "ollama"
    record = export(export_runs["lora"], "ollama", out)
    assert all(names(record).values()) and "modelfile" in names(record)
    assert {p.name for p in out.iterdir()} == {"model-Q8_0.gguf", "Modelfile", "export.json"}
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf" in text and "ADAPTER" not in text
    assert 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_dora_merges_to_a_folder(export_runs, tmp_path):
    record = export(export_runs["dora"], "hf", tmp_path / "dora")
    assert record.source.method == "dora" and all(names(record).values())


def test_int8_base_run_merges_into_the_dequantized_base(export_runs, tmp_path):
    record = export(export_runs["int8"], "gguf", tmp_path / "int8.gguf", quant="f32")
    assert record.source.method == "lora+int8" and all(names(record).values())
    merge = next(c for c in record.checks if c.name == "merge")
    assert merge.figures["greedy_agreement"] == 1.0


def test_full_fine_tune_exports_as_it_is(export_runs, tmp_path):
    record = export(export_runs["full"], "gguf", tmp_path / "full.gguf", quant="f32")
    assert record.source.tuning == "full" and "merge" not in names(record) and all(names(record).values())


def test_a_registry_reference_is_resolved_and_recorded(export_runs, tmp_path, monkeypatch):
    from tunelab.registry import Registry

    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry"))
    Registry().register(export_runs["lora"], "banking")
    record = export("banking@1", "gguf-adapter", tmp_path / "reg.gguf")
    assert record.source.registry == "banking@1" and record.source.requested == "banking@1"


def test_no_verify_writes_and_says_so(export_runs, tmp_path):
    record = export(export_runs["lora"], "gguf-adapter", tmp_path / "nv.gguf", verify=False)
    assert record.verified is False and record.checks == [] and "not verified" in record.warnings[0]
    assert json.loads((tmp_path / "nv.export.json").read_text())["verified"] is False


def test_a_merge_that_returns_the_base_fails_and_writes_nothing(export_runs, tmp_path, monkeypatch):
    import importlib

    from tunelab.errors import TunelabError

    # (`tunelab.export` is also the function tl.export, so the module is looked up by name)
    merge_module = importlib.import_module("tunelab.export.merge")
    monkeypatch.setattr(merge_module, "merge", lambda src, model: model.unload())  # drops the adapter
    with pytest.raises(TunelabError, match="non-vacuity") as info:
        export(export_runs["lora"], "hf", tmp_path / "vacuous")
    assert "merge:" in str(info.value)  # unmerged vs "merged" differ too
    assert list(tmp_path.iterdir()) == []
