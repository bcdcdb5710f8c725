"""Two `tunelab serve` processes (two API hosts) on one database, SQLite and PostgreSQL, sharing one storage
folder: every queued job is trained by a real worker exactly once, by one of the two, and succeeds."""

from __future__ import annotations

import re
import signal

import pytest

from fine_tuning import TINY, chat_rows, client, server_url, start_server, upload, wait_for
from helpers import write_jsonl

pytestmark = pytest.mark.integration  # real worker processes train real jobs: left out of `make test-fast`

JOBS = 4


def test_two_servers_on_one_database_run_each_job_exactly_once(db_url, tiny_model_dir, tmp_path):
    storage = tmp_path / "storage"
    logs = [tmp_path / f"server{n}.log" for n in range(2)]
    servers = [start_server(tiny_model_dir, storage, log, "--db", db_url) for log in logs]
    try:
        urls = [server_url(server, log) for server, log in zip(servers, logs)]
        first, second = client(urls[0], "local"), client(urls[1], "local")
        f = upload(first, write_jsonl(tmp_path / "train.jsonl", chat_rows()))
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}}
        ids = [first.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=i, method=method,
                                             extra_body={"tunelab": TINY}).id for i in range(JOBS)]
        done = [wait_for(second, job_id) for job_id in ids]  # the other host sees the same jobs
        assert [j.status for j in done] == ["succeeded"] * JOBS, [j.error for j in done]
        for job_id in ids:
            events = [e.message for e in second.fine_tuning.jobs.list_events(job_id, limit=100)]
            assert events.count("Fine-tuning job started") == 1 and not any(m.startswith("Resuming") for m in events)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=60)
    started = [m for log in logs for m in re.findall(r"job (ftjob-\w+): worker \d+ started", log.read_text())]
    assert sorted(started) == sorted(ids)  # each job started once, on one host or the other
