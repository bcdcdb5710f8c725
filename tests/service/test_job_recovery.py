"""Nothing is lost when a job stops: kill -9 of its worker, a pause and a resume, and kill -9 of the server itself.

Each interrupted job must end with the very adapter an uninterrupted job of the same request gives (the
training's exact resume, reached through the queue), report each step once, and never run twice at once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file

from fine_tuning import TINY, chat_rows, client, server_url, start_server, upload, wait_for
from helpers import write_jsonl
from serving import wait_until

pytestmark = pytest.mark.integration  # real worker processes train real jobs: left out of `make test-fast`

# Long enough to stop in the middle: 60 training rows at batch 8, 12 epochs = 96 steps, a checkpoint every 2.
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 12, "batch_size": 8}}}
# Long enough to outlive a server restart (several seconds): twice the rows, 50 epochs, ~750 steps.
LONGER = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 8}}}


def adapter(run_dir: str | Path) -> dict:
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def run_dir_of(state, job_id: str) -> Path:
    from tunelab.service.store import Job

    with state.service.store.session() as db:
        return Path(db.get(Job, job_id).run_dir)


def job_row(state, job_id: str):
    from tunelab.service.store import Job

    with state.service.store.session() as db:
        return db.get(Job, job_id)


def checkpointed_step(state, job_id: str) -> int:
    """The newest whole checkpoint's step of a job's run so far (0 before the first)."""
    from tunelab.training.checkpoint import complete_checkpoints

    folder = state.service.storage.job_dir(job_id)
    runs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
    steps = [int(c.name.removeprefix("step-")) for run in runs for c in complete_checkpoints(run)]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(service, tmp_path_factory):
    """One uninterrupted job of the LONG request: (training file id, its final adapter)."""
    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows()))
    job = wait_for(c, c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id, seed=3,
                                                method=LONG, extra_body={"tunelab": TINY}).id)
    assert job.status == "succeeded", job.error
    steps = [json.loads(x)["step"] for x in (run_dir_of(state, job.id) / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 96
    return f.id, adapter(run_dir_of(state, job.id))


def test_kill_9_of_the_worker_resumes_from_its_checkpoint_to_the_same_adapter(service, reference):
    url, state, keys = service
    file_id, expected = reference
    c = client(url, keys["support"])
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=file_id, seed=3, method=LONG,
                                    extra_body={"tunelab": TINY})
    wait_until(lambda: checkpointed_step(state, job.id) >= 4, timeout=120)
    pid = job_row(state, job.id).worker_pid
    os.kill(pid, signal.SIGKILL)  # a real process, a real signal: no chance to checkpoint or report
    killed_at = checkpointed_step(state, job.id)
    assert killed_at < 96, "the job finished before it could be killed: make LONG longer"
    done = wait_for(c, job.id)
    assert done.status == "succeeded", done.error
    row = job_row(state, job.id)
    assert row.attempt == 2 and row.worker_pid is None
    assert same_weights(adapter(row.run_dir), expected)
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))
    messages = [e.message for e in events]
    assert any("the worker ended with signal 9" in m for m in messages), messages
    assert any(m.startswith("Resuming from checkpoint step") for m in messages), messages
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 97))  # every step reported once, though some ran twice


def test_pause_stops_at_a_checkpoint_and_resume_finishes_the_same_adapter(service, reference):
    url, state, keys = service
    file_id, expected = reference
    c = client(url, keys["support"])
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=file_id, seed=3, method=LONG,
                                    extra_body={"tunelab": TINY})
    wait_until(lambda: checkpointed_step(state, job.id) >= 2, timeout=120)
    paused = c.fine_tuning.jobs.pause(job.id)
    if paused.status != "paused":  # the worker takes the request at its next heartbeat and step
        paused = wait_for(c, job.id, statuses=("paused", "succeeded"), timeout=60)
    assert paused.status == "paused"
    at = checkpointed_step(state, job.id)
    time.sleep(1.0)
    assert checkpointed_step(state, job.id) == at and job_row(state, job.id).worker_pid is None  # nothing runs
    assert c.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for(c, job.id)
    assert done.status == "succeeded", done.error
    assert same_weights(adapter(job_row(state, job.id).run_dir), expected)
    with pytest.raises(openai.ConflictError, match="already succeeded"):
        c.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.ConflictError, match="only a paused job"):
        c.fine_tuning.jobs.resume(job.id)


@pytest.mark.parametrize("worker_too", [False, True], ids=["server", "server-and-worker"])
def test_kill_9_of_the_server_then_a_restart_finishes_the_job_once(tiny_model_dir, tmp_path, worker_too):
    """The server dies (kill -9) while a job trains. Alone, it leaves the worker (in a session of its own) to go
    on: the restarted server adopts the job and never starts it again. With the worker killed too, the restarted
    server finds the worker's process gone and resumes the job from its checkpoint."""
    storage = tmp_path / "service"
    first = start_server(tiny_model_dir, storage, tmp_path / "first.log")
    try:
        c = client(server_url(first, tmp_path / "first.log"), "no-key-needed")
        f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2)))
        job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=3, method=LONGER,
                                        extra_body={"tunelab": TINY})
        wait_until(lambda: checkpoint_steps(storage / "runs" / job.id) >= 2, timeout=120)
        worker = c.fine_tuning.jobs.retrieve(job.id)
    finally:
        first.kill()  # SIGKILL: no shutdown, no cleanup
        first.wait(timeout=30)
    assert worker.status == "running"
    if worker_too:
        pid = int(next(line for line in (tmp_path / "first.log").read_text().splitlines()
                       if f"job {job.id}: worker" in line).split("worker ")[1].split()[0])
        os.kill(pid, signal.SIGKILL)
    second = start_server(tiny_model_dir, storage, tmp_path / "second.log")
    try:
        c = client(server_url(second, tmp_path / "second.log"), "no-key-needed")
        done = wait_for(c, job.id, timeout=600)  # ~750 steps: minutes on a slow or busy machine
        assert done.status == "succeeded", done.error
        assert c.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                         messages=[{"role": "user", "content": "hi"}]).choices
        events = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert events.count("Fine-tuning job started") == 1
        resumed = [m for m in events if m.startswith("Resuming from checkpoint step")]
        assert len(resumed) == (1 if worker_too else 0), events
        steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
        assert len(steps) == len(set(steps))  # each step reported once
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)


def checkpoint_steps(job_folder: Path) -> int:
    from tunelab.training.checkpoint import complete_checkpoints

    runs = [p for p in job_folder.iterdir() if p.is_dir()] if job_folder.is_dir() else []
    return max((int(c.name.removeprefix("step-")) for r in runs for c in complete_checkpoints(r)), default=0)
