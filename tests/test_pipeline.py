"""tunelab.pipeline: one whole run, its summary, and the free-text path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.pipeline import run_pipeline


def test_summary_of_a_classification_run(trained_run):
    s = trained_run.summary
    assert s["task"] == "classification"
    assert Path(s["run_dir"]) == trained_run.path.resolve()
    from tunelab.data.records import read_conversations
    from tunelab.data.split import split_conversations

    cfg = trained_run.cfg
    test_split = split_conversations(read_conversations(cfg.data), cfg.data.split).test
    assert s["test_rows"] == min(cfg.eval.max_rows, len(test_split)) > 0
    assert s["train_rows"] == len(trained_run.result.data.train)
    assert s["precision"] == "fp32 (set in config)"
    assert s["model"] == trained_run.cfg.model
    for key in ("accuracy", "base_accuracy"):
        assert 0.0 <= s[key] <= 1.0
        low, high = s[key + "_ci"]
        assert low <= s[key] <= high
    assert s["base_prompt_tokens"] > s["prompt_tokens"] > 0
    assert s["train_seconds"] > 0 and s["tokens_per_second"] > 0
    assert s["trained_tokens_per_second"] < s["tokens_per_second"]
    report = json.loads((trained_run.path / "eval.json").read_text())
    contenders = report["contenders"]
    assert set(contenders) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert contenders["finetune"]["metrics"]["accuracy"] == s["accuracy"]
    # the legacy "base" numbers are the better of the two prompted baselines
    assert s["base_accuracy"] == max(contenders[n]["metrics"]["accuracy"] for n in ("base_zero_shot", "base_few_shot"))
    assert (trained_run.path / "report.html").is_file() and (trained_run.path / "report.md").is_file()
    manifest = json.loads((trained_run.path / "manifest.json").read_text())
    assert {"eval.json", "report.html", "report.md"} <= set(manifest["files"])


def test_free_text_run_is_scored_with_text_metrics_not_accuracy(tmp_path, make_config):
    rows = [{"messages": [{"role": "user", "content": f"say something number {i}"},
                          {"role": "assistant", "content": f"a free text answer {i} about the quick brown fox"}]}
            for i in range(24)]
    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_config(data, data={"format": "chat_jsonl", "max_length": 160}, train={"epochs": 1, "batch_size": 8})
    summary = run_pipeline(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"forgetting_probe": False})}))
    assert summary["task"] == "free_text" and summary["metric"] == "rouge_l"
    assert summary["accuracy"] is None and summary["base_accuracy"] is None
    run = Path(summary["run_dir"])
    report = json.loads((run / "eval.json").read_text())
    assert report["task"] == "free_text" and report["test_rows"] == summary["test_rows"]
    for c in report["contenders"].values():
        assert {"rouge_l", "chrf", "exact_match", "loss", "perplexity"} <= set(c["metrics"])
        assert len(c["predictions"]) == report["test_rows"]
    assert all(comp["test"] == "paired_bootstrap" for comp in report["comparisons"].values())
    assert "forgetting" not in report
    assert (run / "manifest.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    data_report = json.loads((run / "data.json").read_text())
    assert data_report["stratified"] is False and data_report["labels"] is None


def test_a_bf16_run_trains_evaluates_and_reloads(tmp_path, make_config, classification_csv):
    """Every path that runs the model (training, validation, generation, reference losses, the forgetting
    probe, reloading) runs a bf16 base with fp32 adapters under autocast, as the skipped input cast requires."""
    from tunelab.evaluate.generate import generate
    from tunelab.rundir import load_run
    from tunelab.train.loop import choose_precision

    cfg = make_config(classification_csv, train={"precision": "bf16", "epochs": 1, "eval_every": 2},
                      eval={"compare_base": True})
    summary = run_pipeline(cfg)
    assert summary["precision"] == "bf16 autocast (set in config)"
    report = json.loads((Path(summary["run_dir"]) / "eval.json").read_text())
    assert set(report["contenders"]) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert all(c["metrics"]["loss"] > 0 for c in report["contenders"].values())
    assert "forgetting" in report
    model, tokenizer, _ = load_run(Path(summary["run_dir"]), dtype=torch.bfloat16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    run = generate(model, tokenizer, [[5, 6, 7, 8]], max_new_tokens=3, batch_size=None,
                   precision=choose_precision("bf16"), stop_token_ids=[])
    assert len(run.generations[0].token_ids) == 3
