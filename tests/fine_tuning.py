"""What the fine-tuning API's tests share: a client on the SDK, an upload, waiting for a job, the tiny job's config."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from helpers import classification_rows

# The tiny model trains in a few seconds with these (plain PEFT: no torch.compile in each worker); everything
# else is the job's own default.
TINY = {"model": {"kernels": "reference"}, "data": {"max_length": 64}, "lora": {"rank": 4, "alpha": 8},
        "train": {"precision": "fp32", "learning_rate": 1e-2, "val_rows": 8},
        "eval": {"max_rows": 6, "batch_size": 4, "forgetting_probe": False}}
JOB_TIMEOUT_S = 240


def chat_rows(repeat: int = 1) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}
            for text, label in classification_rows()]
    return rows * repeat


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def upload(c: openai.OpenAI, path: Path):
    with path.open("rb") as f:
        return c.files.create(file=f, purpose="fine-tune")


def wait_for(c: openai.OpenAI, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.status}: {job}"
        time.sleep(0.2)


