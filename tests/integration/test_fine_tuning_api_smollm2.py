"""The fine-tuning API on the real SmolLM2, through the official SDK: a small Banking77 file is uploaded, trained
as a job, evaluated against the base, and served by the same server. Slow (a real training on 2 cores)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest

from fine_tuning import client, upload, wait_for
from helpers import REPO
from serving import listening

LABELS = 8  # the first labels of the demo's file, 40 rows each: 320 rows
ROWS_PER_LABEL = 40
SYSTEM = "Classify the intent."


def banking_rows() -> list[dict]:
    by_label = defaultdict(list)
    with (REPO / "examples" / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row["text"])
    labels = sorted(by_label)[:LABELS]
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                          {"role": "assistant", "content": label}]}
            for label in labels for text in by_label[label][:ROWS_PER_LABEL]]


@pytest.mark.slow
def test_a_banking77_job_on_smollm2_beats_the_base_and_is_served_at_once(tmp_path):
    from tunelab.config import ServeConfig
    from tunelab.registry import Registry
    from tunelab.serve.app import create_app
    from tunelab.serve.server import build_state

    state = build_state(ServeConfig(storage=tmp_path / "service", worker_heartbeat_seconds=1.0),
                        registry=Registry(tmp_path / "registry"))
    try:
        with listening(create_app(state)) as url:
            c = client(url, "local")
            path = tmp_path / "banking.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in banking_rows()))
            f = upload(c, path)
            assert f.status == "processed"
            job = c.fine_tuning.jobs.create(
                model="smollm2-135m-instruct", training_file=f.id, suffix="banking",
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 16}}},
                extra_body={"tunelab": {"data": {"max_length": 128}, "train": {"learning_rate": 2e-3, "val_rows": 16},
                                        "eval": {"forgetting_probe": False}}})
            job = wait_for(c, job.id, timeout=1200)
            assert job.status == "succeeded", job.error
            assert list(c.fine_tuning.jobs.checkpoints.list(job.id))
            evaluation = next(json.loads(c.files.content(i).text) for i in job.result_files
                              if c.files.retrieve(i).filename == "eval.json")
            comparison = evaluation["comparisons"]["base_zero_shot"]
            assert comparison["delta"] > 0 and comparison["significant"], comparison
            question = banking_rows()[0]["messages"][:2]
            answer = c.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=12,
                                               temperature=0)
            assert answer.choices[0].message.content.strip() in {r["messages"][2]["content"] for r in banking_rows()}
    finally:
        state.service.supervisor.stop()
        state.engine.stop(grace_seconds=5)
