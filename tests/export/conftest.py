"""Finished tiny runs to export: LoRA, rsLoRA, DoRA, an int8 base, a full fine-tune, all on one tiny Llama.

The model is the shared tiny tokenizer under a Llama of hidden size 64 (4 heads, 2 KV heads, so the q/k
permutation moves rows between heads of different counts) instead of conftest's 16: Q8_0 quantizes rows in
blocks of 32 values, and a hidden size of 16 would make every matrix fall back to F16. Each run trains one
short epoch (so it is whole), then its LoRA A and B get random weights: a barely trained B is near zero, and
a merge that returned the base would pass unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import classification_rows, make_run_config, write_csv

# name -> (lora config, tuning)
RUNS = {
    "lora": ({"rank": 4, "alpha": 8}, "lora"),
    "rslora": ({"rank": 4, "alpha": 8, "use_rslora": True}, "lora"),
    "dora": ({"rank": 4, "alpha": 8, "use_dora": True}, "lora"),
    "int8": ({"rank": 4, "alpha": 8, "quantize_base": "int8"}, "lora"),
    "full": ({}, "full"),
}


@pytest.fixture(scope="session")
def export_model_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def randomize_lora(run_dir: Path, seed: int, scale: float = 0.1) -> None:
    """Random LoRA A and B (a DoRA magnitude stays as trained), then the manifest again."""
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.rundir import RunDir

    path = run_dir / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * scale if "lora_A" in k or "lora_B" in k else v
               for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    RunDir(run_dir).write_manifest()


@pytest.fixture(scope="session")
def export_runs(export_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import tunelab as tl

    folder = tmp_path_factory.mktemp("export-runs")
    csv_path = write_csv(folder / "intents.csv", classification_rows())
    runs = {}
    for seed, (name, (lora, tuning)) in enumerate(RUNS.items()):
        cfg = make_run_config(export_model_dir, csv_path, folder / name, lora=lora,
                              train={"epochs": 1, "val_rows": 0, "compile_kernels": False, "compile_layers": False,
                                     "learning_rate": 1e-2})
        run = tl.train(cfg.model_copy(update={"tuning": tuning}))
        if tuning == "lora":
            randomize_lora(run.path, seed)
        runs[name] = run.path
    return runs
