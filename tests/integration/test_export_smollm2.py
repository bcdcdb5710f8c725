"""The real model exported: a short LoRA fine-tune of SmolLM2-135M-Instruct on Banking77, registered, then
exported to all four targets with every verification passing. Slow (a short training and four exports of the
real model; about 4 minutes on the 2-core development VM).

Prints each export's checks (pytest -s) so that the figures quoted in docs/export.md can be re-measured.
"""

from __future__ import annotations

import json

import pytest

from helpers import REPO


@pytest.mark.slow
def test_smollm2_fine_tune_exports_to_every_target_and_verifies(tmp_path, monkeypatch):
    import gguf

    import tunelab as tl
    from tunelab.config import RunConfig
    from tunelab.registry import Registry

    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry"))
    cfg = RunConfig.model_validate({
        "name": "banking", "output_dir": str(tmp_path / "runs"),
        "data": {"path": str(REPO / "examples" / "banking77" / "train.csv"), "format": "csv", "input_column": "text",
                 "output_column": "category", "system_prompt": "Classify the intent.", "max_train_rows": 256,
                 "max_length": 128},
        "lora": {"rank": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 2e-3, "val_rows": 0, "precision": "fp32",
                  "compile_kernels": False, "compile_layers": False},
    })
    run = tl.train(cfg)
    version = Registry().register(run.path, "banking")

    records = {
        "hf": tl.export(version.ref, to="hf", path=tmp_path / "out" / "banking-merged"),
        "gguf": tl.export(run, to="gguf", path=tmp_path / "out" / "banking.gguf", quant="q8_0"),
        "gguf-f16": tl.export(run, to="gguf", path=tmp_path / "out" / "banking-f16.gguf", quant="f16"),
        "gguf-adapter": tl.export(run, to="gguf-adapter", path=tmp_path / "out" / "banking-lora.gguf"),
        "ollama": tl.export(run, to="ollama", path=tmp_path / "out" / "banking-ollama"),
    }
    for name, record in records.items():
        sizes = ", ".join(f"{f} {r.bytes / 1e6:.1f} MB" for f, r in record.files.items())
        print(f"\n{name}: {record.seconds:.0f} s, {record.tensor_types}, {sizes}, warnings {record.warnings}")
        for check in record.checks:
            print(f"  {check.name}: {check.passed} {check.figures}")
        if record.tokenization:
            print(f"  tokenization: {record.tokenization}")
        assert record.verified and record.checks and not record.failed(), name
    assert records["hf"].source.registry == "banking@1"
    assert not (tmp_path / "out" / "banking-merged" / "adapter_config.json").exists()
    merged_gguf = gguf.GGUFReader(tmp_path / "out" / "banking.gguf")
    assert merged_gguf.get_field("tokenizer.ggml.pre").contents() == "smollm"
    assert "output.weight" not in {t.name for t in merged_gguf.tensors}  # tied: llama.cpp reuses token_embd
    for name in ("hf", "gguf", "ollama"):
        assert {c.name for c in records[name].checks} >= {"merge", "non-vacuity"}
    assert records["gguf"].tokenization.agrees and records["gguf-adapter"].tokenization.agrees
    modelfile = (tmp_path / "out" / "banking-ollama" / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf" in modelfile and "ADAPTER" not in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    saved = json.loads((tmp_path / "out" / "banking.export.json").read_text())
    assert saved["files"]["banking.gguf"]["sha256"] and saved["quant"] == "q8_0"
