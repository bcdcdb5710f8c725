"""service/store.py and service/keys.py on SQLite and PostgreSQL: migrations, keys, the job queue's claim."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

import tunelab
from tunelab.errors import TunelabError
from tunelab.service.keys import any_keys, create_key, principal_for, revoke_key
from tunelab.service.migrate import alembic_config
from tunelab.service.store import QUEUED, RUNNING, Base, Job, Project, Store

TABLES = {"projects", "api_keys", "files", "jobs", "job_events", "checkpoints", "fine_tuned_models"}


def head_revision(store: Store) -> str:
    return ScriptDirectory.from_config(alembic_config(store.engine)).get_current_head()


def stored_revision(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def add_project(store: Store, name: str = "p") -> str:
    with store.session() as db:
        db.add(Project(id=f"proj_{name}", name=name, created_at=1))
    return f"proj_{name}"


def add_jobs(store: Store, project: str, specs: list[tuple[str, int, str]]) -> None:
    """Jobs as (id, created_at, status), every required column filled."""
    with store.session() as db:
        for job_id, created_at, status in specs:
            db.add(Job(id=job_id, project_id=project, created_at=created_at, status=status, model="base-model",
                       training_file="file-train", seed=0, method={}, tunelab={}, result_files=[]))


# -- migrations ---------------------------------------------------------------------------------------------------


def test_open_creates_every_table_at_head(db_url: str) -> None:
    store = Store.open(db_url)
    try:
        tables = set(sa.inspect(store.engine).get_table_names())
        assert TABLES == set(Base.metadata.tables)  # the list above is the models' list
        assert TABLES | {"alembic_version"} <= tables
        jobs = {column["name"] for column in sa.inspect(store.engine).get_columns("jobs")}
        assert {column.name for column in Base.metadata.tables["jobs"].columns} == jobs
        assert stored_revision(store) == [head_revision(store)]
    finally:
        store.engine.dispose()


def test_opening_again_is_a_no_op(db_url: str) -> None:
    first = Store.open(db_url)
    try:
        add_project(first, "kept")
        head = stored_revision(first)
    finally:
        first.engine.dispose()
    second = Store.open(db_url)
    try:
        assert stored_revision(second) == head == [head_revision(second)]
        with second.session() as db:
            assert db.scalars(sa.select(Project.name)).all() == ["kept"]
    finally:
        second.engine.dispose()


# -- keys ---------------------------------------------------------------------------------------------------------


def test_key_is_stored_as_its_sha256_only(store: Store) -> None:
    secret, record = create_key(store, "support", name="ci")
    assert secret.startswith("tl-")
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_keys")).mappings().all()
        every_value = [value for table in TABLES for row in conn.execute(sa.text(f"SELECT * FROM {table}"))
                       for value in row]
    assert len(rows) == 1
    assert rows[0]["sha256"] == hashlib.sha256(secret.encode()).hexdigest() == record.sha256
    assert not any(secret in str(value) for value in every_value)


def test_principal_for_a_key_and_its_revocation(store: Store) -> None:
    secret, record = create_key(store, "support")
    principal = principal_for(store, secret)
    assert principal is not None
    assert (principal.project, principal.key_id) == ("support", record.id)
    assert principal_for(store, secret + "x") is None
    assert principal_for(store, "tl-" + "A" * 43) is None
    assert revoke_key(store, record.id).revoked_at is not None
    assert principal_for(store, secret) is None


def test_any_keys_stays_true_after_revoking(store: Store) -> None:
    assert not any_keys(store)
    _, record = create_key(store, "support")
    assert any_keys(store)
    revoke_key(store, record.prefix)
    assert any_keys(store)  # revoking the last key must not open the server


@pytest.mark.parametrize("name", ["", "Support", "-x", "a b", "../etc", "x" * 65])
def test_bad_project_name_is_refused(store: Store, name: str) -> None:
    with pytest.raises(TunelabError, match="not allowed"):
        create_key(store, name)
    assert not any_keys(store)


def test_projects_are_distinct(store: Store) -> None:
    alpha, _ = create_key(store, "alpha")
    beta, _ = create_key(store, "beta")
    alpha_again, _ = create_key(store, "alpha")
    a, b, a2 = (principal_for(store, secret) for secret in (alpha, beta, alpha_again))
    assert a is not None and b is not None and a2 is not None
    assert (a.project, b.project) == ("alpha", "beta")
    assert a.project_id != b.project_id
    assert a2.project_id == a.project_id and a2.key_id != a.key_id
    with store.session() as db:
        assert sorted(db.scalars(sa.select(Project.name))) == ["alpha", "beta"]


# -- the queue ----------------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_queued_job(store: Store) -> None:
    project = add_project(store)
    add_jobs(store, project, [
        ("ftjob-c", 30, QUEUED),
        ("ftjob-old-running", 1, RUNNING),
        ("ftjob-old-paused", 2, "paused"),
        ("ftjob-old-done", 3, "succeeded"),
        ("ftjob-old-validating", 4, "validating_files"),
        ("ftjob-a", 10, QUEUED),
        ("ftjob-b2", 20, QUEUED),
        ("ftjob-b1", 20, QUEUED),  # same second: the id decides
    ])
    claimed = []
    while (job := store.claim_next(lease=f"lease-{len(claimed)}", host="host-1")) is not None:
        assert (job.status, job.attempt, job.worker_host) == (RUNNING, 1, "host-1")
        assert job.lease == f"lease-{len(claimed)}" and job.heartbeat_at is not None
        claimed.append(job.id)
    assert claimed == ["ftjob-a", "ftjob-b1", "ftjob-b2", "ftjob-c"]
    with store.session() as db:
        untouched = {job.id: (job.status, job.attempt, job.lease)
                     for job in db.scalars(sa.select(Job).where(Job.id.like("ftjob-old-%")))}
    assert untouched == {"ftjob-old-running": (RUNNING, 0, None), "ftjob-old-paused": ("paused", 0, None),
                         "ftjob-old-done": ("succeeded", 0, None),
                         "ftjob-old-validating": ("validating_files", 0, None)}


def test_claim_with_nothing_queued_is_none(store: Store) -> None:
    assert store.claim_next("lease", "host") is None


CLAIMER = textwrap.dedent("""
    import json, os, sys
    from tunelab.service.store import Store, create_engine
    store = Store(create_engine(sys.argv[1]))
    with store.engine.connect():  # connect (and import the driver) before the start signal
        pass
    print("ready", flush=True)
    sys.stdin.readline()  # go: every claimer starts at once
    claimed = []
    while (job := store.claim_next(lease=f"{os.getpid()}-{len(claimed)}", host=sys.argv[2])) is not None:
        claimed.append(job.id)
    print(json.dumps(claimed), flush=True)
""")


def test_two_processes_never_claim_the_same_job(store: Store, db_url: str) -> None:
    project = add_project(store)
    jobs = [f"ftjob-{i:03d}" for i in range(40)]
    add_jobs(store, project, [(job_id, 1000 + i % 7, QUEUED) for i, job_id in enumerate(jobs)])
    store.engine.dispose()  # no connection of ours in the way (SQLite's WAL, PostgreSQL's locks)
    outputs = together(CLAIMER, [[db_url, f"host-{n}"] for n in range(2)])
    per_process = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    every_claim = [job_id for claimed in per_process for job_id in claimed]
    assert sorted(every_claim) == jobs  # each job once, none twice, none left
    with store.session() as db:
        rows = db.scalars(sa.select(Job)).all()
    assert {(job.status, job.attempt) for job in rows} == {(RUNNING, 1)}
    hosts = {job.id: job.worker_host for job in rows}
    for n, claimed in enumerate(per_process):
        assert all(hosts[job_id] == f"host-{n}" for job_id in claimed)


OPENER = textwrap.dedent("""
    import sys
    from tunelab.service.store import Store
    print("ready", flush=True)  # SQLAlchemy and Alembic imported
    sys.stdin.readline()  # go: every process migrates at once
    Store.open(sys.argv[1])
    print("opened", flush=True)
""")


def test_hosts_starting_together_on_a_fresh_database_all_open_it(db_url: str) -> None:
    """Each API host migrates its database at start; three at once on an empty one must not trip on each other
    (on PostgreSQL two CREATE TABLEs of the same table collide without migrations/env.py's advisory lock)."""
    outputs = together(OPENER, [[db_url]] * 3)
    assert [out.strip().splitlines()[-1] for out in outputs] == ["opened"] * 3
    store = Store.open(db_url)
    try:
        assert stored_revision(store) == [head_revision(store)]
    finally:
        store.engine.dispose()


def together(script: str, argvs: list[list[str]], timeout: float = 60) -> list[str]:
    """Run `python -c script ARGV` once per argv, start them at the same moment (each prints "ready", then waits
    for a line on stdin), and return each one's stdout; a process that fails fails the test with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(tunelab.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for argv in argvs]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    return [out for out, _ in outputs]
