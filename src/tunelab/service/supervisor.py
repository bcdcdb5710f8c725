"""The supervisor: takes queued jobs from the store, runs each in a worker process, and recovers from crashes.

One supervisor thread runs in each `tunelab serve` process. Every tick it

1. reaps its workers: one that exited while its job still says `running` under its lease died without
   reporting (kill -9, the OOM killer): the job is cancelled or paused if that was asked, else queued again
   to resume from its newest checkpoint, or failed after `max_attempts` starts;
2. recovers jobs whose worker nobody watches: `running` with a worker on this host whose process is gone
   (the server itself was killed and restarted), or with a heartbeat older than `stale_seconds` (a worker on
   another host sharing a PostgreSQL). A worker that outlived its server keeps beating and is left to finish:
   the restarted server adopts it by leaving it alone;
3. kills a worker that was asked to cancel or pause and has not stopped within `stop_grace_seconds`;
4. claims queued jobs (store.claim_next: each exactly once, across processes and hosts) while fewer than
   `concurrency` of its workers run, and starts a worker for each.

Workers start in a session of their own, so a Ctrl-C or SIGTERM to the server does not reach them: a job
outlives a server restart. Cancel and pause reach a worker through the store (its heartbeat reads them).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tunelab.service.files import Storage
from tunelab.service.store import FAILED, RUNNING, Job, Store, new_id, now
from tunelab.service.worker import LOG, stop_as

log = logging.getLogger("tunelab.service")


@dataclass(frozen=True)
class SupervisorConfig:
    db_url: str
    base: str  # the served base model: every job trains on it
    concurrency: int = 1
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    stale_seconds: float = 60.0
    stop_grace_seconds: float = 60.0
    max_attempts: int = 3
    checkpoint_every: int = 50


@dataclass
class _Child:
    process: subprocess.Popen
    lease: str
    stop_asked_at: float | None = None


class Supervisor:
    def __init__(self, store: Store, storage: Storage, cfg: SupervisorConfig) -> None:
        self.store, self.storage, self.cfg = store, storage, cfg
        self.host = socket.gethostname()
        self.children: dict[str, _Child] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunelab-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the queue now (a job was queued or asked to stop), not at the next tick."""
        self._wake.set()

    def stop(self) -> None:
        """Stop supervising; the workers go on (a restarted server adopts them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def running(self) -> int:
        return len(self.children)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a busy or briefly unreachable database: try again next tick
                log.exception("supervisor tick failed")
            self._wake.wait(self.cfg.poll_seconds)
            self._wake.clear()

    def tick(self) -> None:
        self._reap()
        self._recover()
        self._escalate()
        while len(self.children) < self.cfg.concurrency and not self._stop.is_set():
            lease = new_id("lease_")
            job = self.store.claim_next(lease, self.host)
            if job is None:
                break
            self._spawn(job, lease)

    # ------------------------------------------------------------------------------------------------- steps
    def _spawn(self, job: Job, lease: str) -> None:
        folder = self.storage.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        command = [sys.executable, "-m", "tunelab.service.worker", "--db", cfg.db_url, "--storage",
                   str(self.storage.root), "--base", cfg.base, "--job", job.id, "--lease", lease,
                   "--heartbeat", str(cfg.heartbeat_seconds), "--checkpoint-every", str(cfg.checkpoint_every)]
        # The worker imports the very tunelab this server runs (not whatever the working directory or an
        # installed copy would give it): the folder this package was imported from goes first on its path.
        here = str(Path(__file__).resolve().parents[2])  # src/ (or site-packages/) holding this tunelab
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        with (folder / LOG).open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env=env)
        self.children[job.id] = _Child(process, lease)
        with self.store.session() as db:
            row = db.get(Job, job.id)
            if row is not None and row.lease == lease:
                row.worker_pid = process.pid
        log.info("job %s: worker %d started (attempt %d)", job.id, process.pid, job.attempt)

    def _reap(self) -> None:
        for job_id, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[job_id]
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            with self.store.session() as db:
                job = db.get(Job, job_id, populate_existing=True)
                if job is None or job.status != RUNNING or job.lease != child.lease:
                    continue  # it reported its own end (or was handed to another attempt)
                self._after_death(db, job, f"the worker ended with {how} without reporting")

    def _recover(self) -> None:
        cutoff = time.time() - self.cfg.stale_seconds
        with self.store.session() as db:
            for job in db.scalars(select(Job).where(Job.status == RUNNING)):
                if job.id in self.children:
                    continue
                if job.worker_host == self.host and job.worker_pid is not None and not _alive(job.worker_pid):
                    self._after_death(db, job, f"its worker (pid {job.worker_pid}) is gone")
                elif job.heartbeat_at is not None and job.heartbeat_at < cutoff:
                    self._after_death(db, job, f"no heartbeat for {time.time() - job.heartbeat_at:.0f} s")

    def _escalate(self) -> None:
        asked = {}
        ids = list(self.children)
        if not ids:
            return
        with self.store.session() as db:
            for job_id, cancel, pause in db.execute(select(Job.id, Job.cancel_requested, Job.pause_requested)
                                                    .where(Job.id.in_(ids))):
                asked[job_id] = cancel or pause
        for job_id, child in self.children.items():
            if not asked.get(job_id):
                continue
            if child.stop_asked_at is None:
                child.stop_asked_at = time.monotonic()
            elif time.monotonic() - child.stop_asked_at > self.cfg.stop_grace_seconds:
                log.warning("job %s: the worker did not stop within %.0f s; killing it", job_id,
                            self.cfg.stop_grace_seconds)
                _kill_group(child.process.pid)

    def _after_death(self, db, job: Job, why: str) -> None:  # noqa: ANN001
        if not job.cancel_requested and not job.pause_requested and job.attempt >= self.cfg.max_attempts:
            job.status, job.finished_at, job.lease, job.worker_pid = FAILED, now(), None, None
            job.error = {"code": "worker_failed", "param": None,
                         "message": f"{why}, {job.attempt} times; see {self.storage.job_dir(job.id) / LOG}"}
            self.store.event(db, job.id, f"Fine-tuning job failed: {job.error['message']}", level="error")
            return
        log.warning("job %s: %s", job.id, why)
        stop_as(self.store, db, job, why)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers signal 0: it is not running.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
