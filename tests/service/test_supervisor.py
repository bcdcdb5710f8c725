"""Two supervisors (as two API hosts would run) on one database, SQLite and PostgreSQL: every queued job is
trained by a real worker process exactly once, and succeeds."""

from __future__ import annotations

import json
import time

import pytest

from fine_tuning import TINY, chat_rows
from tunelab.service.files import Storage
from tunelab.service.keys import project_id
from tunelab.service.store import QUEUED, SUCCEEDED, File, Job, JobEvent, Store, new_id, now
from tunelab.service.supervisor import Supervisor, SupervisorConfig

pytestmark = pytest.mark.integration  # real worker processes train real jobs: left out of `make test-fast`

JOBS = 4


def queue_jobs(store: Store, storage: Storage, base: str) -> list[str]:
    data = "".join(json.dumps(r) + "\n" for r in chat_rows()).encode()
    pid = project_id(store, "shared")
    file_id = new_id("file-")
    storage.file(file_id).write_bytes(data)
    ids = [new_id("ftjob-") for _ in range(JOBS)]
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}}
    with store.session() as db:
        db.add(File(id=file_id, project_id=pid, filename="train.jsonl", purpose="fine-tune", bytes=len(data),
                    created_at=now(), status="processed"))
        for i, job_id in enumerate(ids):
            db.add(Job(id=job_id, project_id=pid, created_at=now() + i, status=QUEUED, model=base,
                       training_file=file_id, seed=i, method=method, tunelab=TINY, result_files=[]))
    return ids


def test_two_supervisors_run_each_job_exactly_once(db_url, tiny_model_dir, tmp_path):
    storage = Storage.at(tmp_path / "storage")
    stores = [Store.open(db_url) for _ in range(2)]
    ids = queue_jobs(stores[0], storage, str(tiny_model_dir))
    cfg = SupervisorConfig(db_url=db_url, base=str(tiny_model_dir), concurrency=1, poll_seconds=0.2,
                           heartbeat_seconds=0.3, checkpoint_every=2)
    supervisors = [Supervisor(store, storage, cfg) for store in stores]
    started: list[list[str]] = [[], []]
    for n, supervisor in enumerate(supervisors):
        spawn = supervisor._spawn

        def counting(job, lease, spawn=spawn, n=n):  # noqa: ANN001 - which supervisor started which job
            started[n].append(job.id)
            spawn(job, lease)

        supervisor._spawn = counting
        supervisor.start()
    try:
        deadline = time.monotonic() + 300
        while True:
            with stores[0].session() as db:
                statuses = {j.id: j.status for j in db.query(Job)}
            if all(s in (SUCCEEDED, "failed", "cancelled") for s in statuses.values()):
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.5)
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    assert statuses == {job_id: SUCCEEDED for job_id in ids}
    assert sorted(started[0] + started[1]) == sorted(ids)  # each started once, by one of the two
    with stores[0].session() as db:
        assert {j.attempt for j in db.query(Job)} == {1}
        starts = [e.job_id for e in db.query(JobEvent) if e.message == "Fine-tuning job started"]
    assert sorted(starts) == sorted(ids)
    for store in stores:
        store.engine.dispose()
