"""tunelab.pipeline: one whole run, its summary, the free-text path, records in memory, a DPO run's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.evaluation.result import EvalResult
from tunelab.pipeline import run_pipeline
from tunelab.rundir import RunDir


def test_summary_of_a_classification_run(trained_run):
    s = trained_run.summary
    assert s.task == "classification" and s.metric == "accuracy"
    assert Path(s.run_dir) == trained_run.path.resolve()
    from tunelab.data.read import read_conversations
    from tunelab.data.split import split_conversations

    cfg = trained_run.cfg
    test_split = split_conversations(read_conversations(cfg.data), cfg.data.split).test
    assert s.test_rows == min(cfg.eval.max_rows, len(test_split)) > 0
    assert s.train_rows == len(trained_run.result.data.train)
    assert s.precision == "fp32 (set in the config)"
    assert s.model == trained_run.cfg.model.name and s.tuning == "lora" and s.objective == "sft"
    for name, c in s.contenders.items():
        assert 0.0 <= c.value <= 1.0, name
        low, high = c.ci
        assert low <= c.value <= high
    assert s.contenders["base_few_shot"].prompt_tokens > s.contenders["finetune"].prompt_tokens > 0
    assert s.train_seconds > 0 and s.tokens_per_second > 0
    assert s.trained_tokens_per_second < s.tokens_per_second
    report = EvalResult.read(trained_run.path / "eval.json")
    assert set(report.contenders) == {"finetune", "base_zero_shot", "base_few_shot"}
    for name, c in report.contenders.items():
        assert c.metrics["accuracy"] == s.contenders[name].value
    for name, c in report.comparisons.items():
        assert (c.delta, c.p_value, c.significant) == (s.comparisons[name].delta, s.comparisons[name].p_value,
                                                        s.comparisons[name].significant)
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
    assert summary.task == "free_text" and summary.metric == "rouge_l"
    run = Path(summary.run_dir)
    report = EvalResult.read(run / "eval.json")
    assert report.task == "free_text" and report.test_rows == summary.test_rows
    for c in report.contenders.values():
        assert {"rouge_l", "chrf", "exact_match", "loss", "perplexity"} <= set(c.metrics)
        assert len(c.predictions) == report.test_rows
        assert summary.contenders  # the summary's value is the primary metric, whatever it is
    assert summary.contenders["finetune"].value == report.contenders["finetune"].metrics["rouge_l"]
    assert all(comp.test == "paired_bootstrap" for comp in report.comparisons.values())
    assert report.forgetting is None
    assert (run / "manifest.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    data_report = RunDir(run).data()
    assert data_report.stratified is False and data_report.labels is None


def test_a_bf16_run_trains_evaluates_and_reloads(tmp_path, make_config, classification_csv):
    """Every path that runs the model (training, validation, generation, reference losses, the forgetting
    probe, reloading) runs a bf16 base with fp32 adapters under autocast, as the skipped input cast requires."""
    from tunelab.evaluation.generate import generate
    from tunelab.model.precision import choose_precision
    from tunelab.rundir import load_run

    cfg = make_config(classification_csv, train={"precision": "bf16", "epochs": 1, "eval_every": 2},
                      eval={"compare_base": True})
    summary = run_pipeline(cfg)
    assert summary.precision == "bf16 autocast (set in the config)"
    report = EvalResult.read(Path(summary.run_dir) / "eval.json")
    assert set(report.contenders) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert all(c.metrics["loss"] > 0 for c in report.contenders.values())
    assert report.forgetting is not None
    model, tokenizer, _ = load_run(Path(summary.run_dir), dtype=torch.bfloat16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    run = generate(model, tokenizer, [[5, 6, 7, 8]], max_new_tokens=3, batch_size=None,
                   precision=choose_precision("bf16"), stop_token_ids=[])
    assert len(run.generations[0].token_ids) == 3


def test_records_in_memory_train_a_whole_run_that_keeps_them(tmp_path, make_config):
    """tunelab.train(cfg, records=...): the records become the run's records.jsonl, so the run evaluates, reloads
    and resumes from its own folder; the data report hashes exactly those bytes."""
    import hashlib

    import tunelab as tl
    from helpers import classification_rows

    records = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}
               for text, label in classification_rows()]
    cfg = make_config(tmp_path / "unused.csv", eval={"forgetting_probe": False})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": None, "format": "auto"})})
    run = tl.train(cfg, records=records)
    assert run.manifest() is not None and (run.path / "adapter" / "adapter_config.json").is_file()
    kept = run.path / "records.jsonl"
    assert run.config().data.path == kept and run.config().data.format == "auto"
    data = run.data()
    assert data.path == str(kept) and data.rows == 75
    assert data.sha256 == hashlib.sha256(kept.read_bytes()).hexdigest()
    result = tl.evaluate(run)
    assert result.task == "classification" and result.test_rows > 0 and str(kept) in result.data
    assert run.manifest().evaluations == {"held-out": "eval.json"}


def test_a_dpo_run_is_evaluated_on_its_held_out_pairs_and_gated_like_any_run(make_config, tmp_path):
    """Before, a DPO run's eval.json had no comparisons and the gate refused it saying the file was old."""
    from helpers import pairs_file
    from tunelab.registry import Registry

    cfg = make_config(pairs_file(tmp_path), data={"format": "chosen_rejected"},
                      train={"learning_rate": 1e-2, "epochs": 6, "batch_size": 4, "val_rows": 4},
                      eval={"forgetting_probe": False})
    summary = run_pipeline(cfg.model_copy(update={"objective": "dpo"}))
    report = EvalResult.read(Path(summary.run_dir) / "eval.json")
    assert report.task == "preference" and report.metric == "preference_accuracy" and report.test_rows > 0
    assert set(report.contenders) == {"finetune", "base_zero_shot"}
    assert report.comparisons["base_zero_shot"].test == "mcnemar"
    # The trained policy prefers the chosen answers more often than the base does.
    assert report.contenders["finetune"].metrics["margin_mean"] > report.contenders["base_zero_shot"].metrics["margin_mean"]
    reg = Registry(tmp_path / "registry")
    version = reg.register(Path(summary.run_dir), "prefs")
    verdict = version.evaluation()
    from tunelab.registry import gate

    reasons = gate(verdict).reasons
    assert not any("tunelab-eval/1" in r or "no comparisons" in r for r in reasons), reasons
