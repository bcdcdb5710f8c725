"""The fine-tuning service's tables (SQLAlchemy 2): projects, keys, files, jobs, events, checkpoints, models.

    store = Store.open("sqlite:////home/me/.cache/tunelab/service/service.sqlite")   # the default
    store = Store.open("postgresql+psycopg://tunelab@127.0.0.1:5432/tunelab")         # several API hosts
    with store.session() as db:                       # one transaction: committed at the end, rolled back on error
        job = db.get(Job, "ftjob-...")

The jobs table is the queue of record (no broker): `claim_next` moves one `queued` job to `running`
with a fresh lease in one conditional UPDATE, so two supervisors, in one process or on two hosts
sharing a PostgreSQL, never start the same job. Alembic owns the schema (service/migrations/): `open`
upgrades the database to the newest revision before anything reads it.

SQLite (the embedded default, nothing to install) runs in WAL mode, and every transaction starts with
`BEGIN IMMEDIATE`: it takes the write lock before it reads, so a read-then-write (a claim, a cancel)
never fails half-way with SQLITE_BUSY; `busy_timeout` makes the others wait for it instead of erring.
SQLite is for one host: WAL does not work over a network filesystem.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, event, select, update
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tunelab.errors import TunelabError

SQLITE_BUSY_TIMEOUT_MS = 30_000

# The job statuses, OpenAI's plus `paused` (its pause endpoint returns that value although its enum omits it).
VALIDATING, QUEUED, RUNNING, PAUSED = "validating_files", "queued", "running", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({VALIDATING, QUEUED, RUNNING, PAUSED})  # count against a key's concurrent-jobs limit


def now() -> int:
    """Unix seconds, as every OpenAI timestamp."""
    return int(time.time())


def new_id(prefix: str) -> str:
    """`file-`, `ftjob-`, ... and 24 random letters and digits, as OpenAI's ids look."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(Integer)


class ApiKey(Base):
    """A bearer key: only its sha256 is stored; `prefix` (its first characters) tells keys apart in listings."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)  # None: no limit
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)  # jobs not yet finished, per key; None: no limit


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))  # the client's name: shown, never used as a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # uploaded -> processed | error
    status_details: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the validator's report (data/validate.py)
    job_id: Mapped[str | None] = mapped_column(String(40))  # a result file: the job it belongs to


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_id: Mapped[str | None] = mapped_column(String(40))  # who created it (the concurrent-jobs limit)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    model: Mapped[str] = mapped_column(String(512))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # OpenAI's shape, hyperparameters "auto" until resolved
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    tunelab: Mapped[dict[str, Any]] = mapped_column(JSON)  # extra_body tunelab: RunConfig keys, validated at create
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    finished_at: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[int | None] = mapped_column(Integer)
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    result_files: Mapped[list[Any]] = mapped_column(JSON)
    # The queue's bookkeeping: never shown to clients.
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # starts so far; a resume after a crash is one more
    lease: Mapped[str | None] = mapped_column(String(40))  # the running attempt's token: heartbeats must match it
    worker_host: Mapped[str | None] = mapped_column(String(255))
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    reported_step: Mapped[int] = mapped_column(Integer, default=0)  # metrics events sent up to this step
    run_dir: Mapped[str | None] = mapped_column(Text)  # the run directory, once training created it


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the order, and the SSE id
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(8))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)


class FineTunedModel(Base):
    """A job's model, servable as `ft:{base}:{project}:{suffix}:{job}` by the project that trained it."""

    __tablename__ = "fine_tuned_models"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[int] = mapped_column(Integer)
    run_dir: Mapped[str] = mapped_column(Text)


class Store:
    """An engine and a session factory on one migrated database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect, upgrade the schema to the newest migration, and return the store."""
        from tunelab.service.migrate import upgrade

        store = cls(create_engine(url))
        upgrade(store.engine)
        return store

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as db:
            yield db

    def claim_next(self, lease: str, host: str) -> Job | None:
        """Move the oldest queued job to running under `lease`, or None when none is queued.

        One UPDATE whose WHERE re-checks `status = 'queued'`: when two claimers pick the same row, the
        second finds it no longer queued and updates nothing (PostgreSQL re-evaluates the condition on the
        row the first one wrote; SQLite runs one writer at a time). SKIP LOCKED lets PostgreSQL claimers
        pass over a row another is claiming instead of waiting for it.
        """
        with self.session() as db:
            oldest = (select(Job.id).where(Job.status == QUEUED).order_by(Job.created_at, Job.id).limit(1)
                      .with_for_update(skip_locked=True).scalar_subquery())
            claimed = db.execute(
                update(Job).where(Job.id == oldest, Job.status == QUEUED)
                .values(status=RUNNING, lease=lease, worker_host=host, worker_pid=None, heartbeat_at=time.time(),
                        attempt=Job.attempt + 1)
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            return None if claimed is None else db.get(Job, claimed, populate_existing=True)

    def event(self, db: Session, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict[str, Any] | None = None) -> None:
        db.add(JobEvent(job_id=job_id, created_at=now(), level=level, type=type_, message=message, data=data))


def create_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys, and BEGIN IMMEDIATE transactions."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa_create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                     "check_same_thread": False})
        _sqlite_transactions(engine)
        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://") or url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not SQLAlchemy's default psycopg2
        try:
            return sa_create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise TunelabError(f"a PostgreSQL database needs the psycopg driver ({exc.name} is not installed)",
                               fix="pip install 'tunelab[serve]'") from None
    raise TunelabError(f"unsupported database URL {url.split('://', 1)[0]}://...",
                       fix="use sqlite:////absolute/path.sqlite or postgresql://user@host:port/db")


def _sqlite_transactions(engine: Engine) -> None:
    """SQLAlchemy's documented recipe for SQLite: take transactions from pysqlite (which would begin them
    lazily, on the first write) and begin each one IMMEDIATE ourselves."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:  # noqa: ANN001
        connection.exec_driver_sql("BEGIN IMMEDIATE")
