"""tunelab.rundir: the run directory describes itself, and loads back to the same model."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import expected_files, files_of
from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.evaluation.result import EvalResult
from tunelab.rundir import MANIFEST, RunData, RunDir, finished, load_run


def test_run_directory_holds_exactly_the_expected_files(trained_run):
    assert files_of(trained_run.path) == expected_files(trained_run.path)
    assert trained_run.path.parent == trained_run.cfg.output_dir
    assert trained_run.path.name.startswith("tiny-")


def test_manifest_lists_every_other_file_and_is_written_last(trained_run):
    path = trained_run.path
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == "tunelab-run/2"
    assert set(manifest["files"]) == expected_files(path) - {MANIFEST}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry["bytes"] == len(data), name
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert manifest["summary"] == trained_run.summary.model_dump(mode="json")
    assert manifest["evaluations"] == {"held-out": "eval.json"}
    assert RunDir(path).manifest().summary == trained_run.summary
    newest_other = max((path / name).stat().st_mtime_ns for name in manifest["files"])
    assert (path / MANIFEST).stat().st_mtime_ns >= newest_other


def test_config_and_data_reports(trained_run):
    path = trained_run.path
    saved = RunConfig.model_validate_json((path / "config.json").read_text())
    assert saved == trained_run.cfg
    assert saved.data.path.is_absolute()
    data = RunData.model_validate_json((path / "data.json").read_text())
    assert data == RunDir(path).data()
    assert data.rows == 75 and data.stratified is True and data.labels == 5
    assert sum(data.splits.values()) == 75
    assert data.train_rows_used == data.splits["train"]
    assert data.sha256 == hashlib.sha256(trained_run.cfg.data.path.read_bytes()).hexdigest()
    assert data.base_model.path == str(trained_run.result.resolved.path)
    assert {name: h.source for name, h in data.hyperparameters.items()} == {
        "epochs": "config", "batch_size": "config", "learning_rate": "config"}
    assert len(data.lengths.tokens) == data.train_rows_used
    adapter_cfg = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    evaluation = EvalResult.read(path / "eval.json")
    assert evaluation.format == "tunelab-eval/2" and evaluation.task == "classification"
    assert set(evaluation.contenders) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert evaluation.forgetting is not None and set(evaluation.comparisons) == {"base_zero_shot", "base_few_shot"}
    assert trained_run.summary.contenders["finetune"].value == evaluation.primary("finetune")[0]


def _batch(tokenizer):
    texts = ["<|im_start|>user\nwhere is my card<|im_end|>\n<|im_start|>assistant\n", "hello world, thank you"]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_reloaded_adapter_gives_identical_logits(trained_run, tiny_model_dir):
    trained = trained_run.result.model
    trained.eval()
    model, tokenizer, cfg = load_run(trained_run.path)
    assert cfg == trained_run.cfg
    assert tokenizer.chat_template == trained_run.result.tokenizer.chat_template
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
        base.eval()
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            off = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(off, base_logits, rtol=1e-5, atol=1e-6)
        # ...and the adapter does change the model (so the two checks above are not the same check)
        assert (got - base_logits).abs().max() > 1e-2


def test_unfinished_run_is_refused(tmp_path):
    run = RunDir.create(tmp_path, "x")
    run.write_json("config.json", {"data": {"path": "x.csv"}})
    assert run.config().data.path.name == "x.csv"  # resume reads an unfinished run's config
    with pytest.raises(TunelabError, match="not a finished run"):
        finished(run.path)
    with pytest.raises(TunelabError, match="not a finished run"):
        load_run(run.path)


def test_a_file_that_does_not_parse_is_named_with_its_field(tmp_path):
    run = RunDir.create(tmp_path, "x")
    run.write_json("config.json", {"train": {"epochs": "many"}})
    with pytest.raises(TunelabError, match=r"config.json: train.epochs: .*written by another tunelab version"):
        run.config()
    with pytest.raises(TunelabError, match="data.json is missing"):
        run.data()


def test_run_dir_names_never_collide_and_manifest_skips_temp_files(tmp_path):
    a, b, c = (RunDir.create(tmp_path, "same") for _ in range(3))
    assert len({a.path, b.path, c.path}) == 3 and all(p.path.is_dir() for p in (a, b, c))
    a.write_json("eval.json", {"x": 1})
    a.append_metrics({"step": 1})
    a.append_metrics({"step": 2})
    (a.path / ".eval.json.tmp").write_text("partial")
    time.sleep(0.01)
    a.write_manifest()
    manifest = json.loads((a.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"eval.json", "metrics.jsonl"}
    assert [json.loads(x) for x in (a.path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    assert not [p for p in os.listdir(a.path) if p.startswith(".") and p != ".eval.json.tmp"]
