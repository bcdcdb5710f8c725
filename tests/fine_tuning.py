"""What the fine-tuning API's tests share: a client on the SDK, an upload, waiting for a job, the tiny job's config,
a `tunelab serve` process."""

from __future__ import annotations

import os
import subprocess
import sys
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


def start_server(model_dir: Path, storage: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`tunelab serve` on the tiny model in a process of its own (port 0: see server_url), output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tunelab", "serve", "--base", str(model_dir), "--port", "0", "--storage",
               str(storage), "--set", "precision=fp32", "--set", "weight_layout=plain", "--set", "max_lora_rank=8",
               "--set", "worker_heartbeat_seconds=0.3", "--set", "job_checkpoint_every=2", *extra]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def server_url(process: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The address uvicorn printed (the server was started on port 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        for line in text.splitlines():
            if "running on http://127.0.0.1:" in line.lower():
                return "http://127.0.0.1:" + line.lower().split("http://127.0.0.1:")[1].split()[0]
        assert process.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(f"the server did not start: {log.read_text(errors='replace')}")
