"""One fine-tuning job, in a child process of the supervisor: train, evaluate, and report to the store.

    python -m tunelab.service.worker --db URL --storage DIR --base MODEL --job ftjob-... --lease L

The training is `tunelab train`'s own pipeline (pipeline.run_pipeline: train, evaluate against the base,
report), run on the job's RunConfig (jobs.run_config). Beside it a heartbeat thread, every few seconds:

- stamps the job's heartbeat, only while the job still carries this attempt's lease: when the supervisor
  gave the job to another attempt (this one was presumed dead), the update finds nothing and this process
  exits at once without writing anything else;
- turns the run's new metrics lines into `metrics` events and its new whole checkpoints into checkpoints;
- asks the training to stop when a cancel or a pause was requested: SIGTERM to this process, which the
  training loop takes at the next step boundary, checkpoints, and stops (training/recipe.StopOnSignal).

A job's folder carries an exclusive lock (flock) that each attempt takes before it touches the run, so two
processes of one job never train at once, whatever the heartbeats say. A new attempt continues the run
from its newest whole checkpoint: the training issue's exact resume, so the final adapter is the one an
uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from tunelab.errors import Interrupted, TunelabError
from tunelab.service.files import RESULTS_PURPOSE, Storage
from tunelab.service.jobs import model_name, run_config
from tunelab.service.store import (
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Checkpoint,
    File,
    FineTunedModel,
    Job,
    Project,
    Store,
    create_engine,
    new_id,
    now,
)

log = logging.getLogger("tunelab.service.worker")
LOCK = ".lock"
LOG = "worker.log"
EXIT_SUPERSEDED = 3  # the lease went to another attempt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.service.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--storage", required=True, type=Path)
    parser.add_argument("--base", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--lease", required=True)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args(argv)
    storage = Storage.at(args.storage)
    folder = storage.job_dir(args.job)
    folder.mkdir(parents=True, exist_ok=True)
    _log_to(folder / LOG)
    store = Store(create_engine(args.db))
    with (folder / LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a previous attempt's process, if one lives on, finishes first
        return Attempt(store, storage, args.job, args.lease, args.base, args.heartbeat, args.checkpoint_every).run()


class Attempt:
    def __init__(self, store: Store, storage: Storage, job_id: str, lease: str, base: str, heartbeat: float,
                 checkpoint_every: int) -> None:
        self.store, self.storage, self.job_id, self.lease, self.base = store, storage, job_id, lease, base
        self.folder = storage.job_dir(job_id)
        self.heartbeat_s, self.checkpoint_every = heartbeat, checkpoint_every

    def run(self) -> int:
        with self.store.session() as db:
            job = db.get(Job, self.job_id)
            if job is None or job.lease != self.lease or job.status != RUNNING:
                log.info("%s: superseded before it started", self.job_id)
                return EXIT_SUPERSEDED
            job.worker_pid = os.getpid()
            project = db.scalar(select(Project.name).where(Project.id == job.project_id))
            resume = self._resumable()
            if resume is None:
                self.store.event(db, job.id, "Fine-tuning job started")
            else:
                step = _checkpoint_step(_newest_checkpoint(resume))
                self.store.event(db, job.id, f"Resuming from checkpoint step {step} (attempt {job.attempt})",
                                 data={"step": step, "attempt": job.attempt})
            cfg = run_config(job, self.storage.file(job.training_file), self.folder, self.base, self.checkpoint_every)
            name = model_name(job.model, project or job.project_id, job.suffix, job.id)
        beat = Heartbeat(self, name)
        beat.start()
        from tunelab.pipeline import run_pipeline  # torch and the model stack: after the cheap checks

        try:
            summary = run_pipeline(cfg, resume=resume)
        except Interrupted:
            beat.stop()
            return self._stopped()
        except TunelabError as exc:
            beat.stop()
            log.error("%s: %s", self.job_id, exc)
            return self._failed(_error_code(exc, cfg.data.path), str(exc), _error_param(exc, cfg.data.path))
        except Exception as exc:
            beat.stop()
            log.exception("%s: training failed", self.job_id)
            return self._failed("internal_error", f"training failed: {type(exc).__name__}: {exc}", None)
        beat.stop()
        beat.report()
        return self._succeeded(Path(summary.run_dir), name, summary)

    # -------------------------------------------------------------------------------------------------- run dir
    def run_dir(self) -> Path | None:
        found = sorted((p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def _resumable(self) -> Path | None:
        """The run to continue: the job's run directory when it has a whole checkpoint; one without any (an
        attempt that died before its first checkpoint) is removed, and training starts over."""
        from tunelab.training.checkpoint import complete_checkpoints

        run = self.run_dir()
        if run is None:
            return None
        if complete_checkpoints(run):
            return run
        shutil.rmtree(run)
        return None

    # -------------------------------------------------------------------------------------------------- outcomes
    def _owned(self, db) -> Job | None:  # noqa: ANN001
        job = db.get(Job, self.job_id, populate_existing=True)
        return job if job is not None and job.lease == self.lease else None

    def _stopped(self) -> int:
        """Training stopped at a step boundary with a checkpoint: cancelled, paused, or (a SIGTERM from outside,
        a shutdown) queued again, to resume from that checkpoint."""
        with self.store.session() as db:
            job = self._owned(db)
            if job is None:
                return EXIT_SUPERSEDED
            stop_as(self.store, db, job, "training stopped at a step boundary, checkpoint saved")
        return 0

    def _failed(self, code: str, message: str, param: str | None) -> int:
        with self.store.session() as db:
            job = self._owned(db)
            if job is None:
                return EXIT_SUPERSEDED
            job.status, job.finished_at, job.lease, job.worker_pid = FAILED, now(), None, None
            job.error = {"code": code, "message": message, "param": param}
            job.estimated_finish = None
            self.store.event(db, job.id, f"Fine-tuning job failed: {message}", level="error")
        return 1

    def _succeeded(self, run: Path, name: str, summary: Any) -> int:
        results = [("step_metrics.csv", metrics_csv(run / "metrics.jsonl")), ("eval.json", _read(run / "eval.json")),
                   ("report.html", _read(run / "report.html"))]
        config = json.loads((run / "config.json").read_text())
        with self.store.session() as db:
            job = self._owned(db)
            if job is None:
                return EXIT_SUPERSEDED
            ids = [self._result_file(db, job, filename, data) for filename, data in results if data is not None]
            db.add(FineTunedModel(id=name, project_id=job.project_id, job_id=job.id, created_at=now(),
                                  run_dir=str(run)))
            job.method = resolved_method(job.method, config)
            job.status, job.finished_at, job.lease, job.estimated_finish = SUCCEEDED, now(), None, None
            job.worker_pid = None
            job.fine_tuned_model, job.result_files, job.run_dir = name, ids, str(run)
            job.trained_tokens = trained_tokens(run / "metrics.jsonl")
            for line in _evaluation_lines(summary):
                self.store.event(db, job.id, line, data={"evaluation": True})
            self.store.event(db, job.id, f"New fine-tuned model created: {name}")
            self.store.event(db, job.id, "The job has successfully completed")
        return 0

    def _result_file(self, db, job: Job, filename: str, data: bytes) -> str:  # noqa: ANN001
        file_id = new_id("file-")
        path = self.storage.file(file_id)
        tmp = path.with_name(f".{file_id}.tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
        db.add(File(id=file_id, project_id=job.project_id, filename=filename, purpose=RESULTS_PURPOSE,
                    bytes=len(data), created_at=now(), status="processed", status_details=None, report=None,
                    job_id=job.id))
        return file_id


def stop_as(store: Store, db, job: Job, why: str) -> None:  # noqa: ANN001
    """A running job whose training stopped (or whose worker died): cancelled or paused as requested, else back
    in the queue to resume from its checkpoint. Clears the lease: this attempt is over."""
    job.lease, job.worker_pid, job.estimated_finish = None, None, None
    if job.cancel_requested:
        job.status, job.finished_at = CANCELLED, now()
        store.event(db, job.id, "Fine-tuning job cancelled")
    elif job.pause_requested:
        job.status, job.pause_requested = PAUSED, False
        store.event(db, job.id, f"Fine-tuning job paused ({why})")
    else:
        job.status = QUEUED
        store.event(db, job.id, f"Fine-tuning job queued again to resume ({why})", level="warn")


class Heartbeat(threading.Thread):
    def __init__(self, attempt: Attempt, model: str) -> None:
        super().__init__(name="tunelab-heartbeat", daemon=True)
        self.attempt, self.model = attempt, model
        self.stopping = threading.Event()
        self.signalled = False
        self.lock = threading.Lock()  # report() runs here and, at the end, on the main thread

    def run(self) -> None:
        while not self.stopping.wait(self.attempt.heartbeat_s):
            try:
                self.beat()
                self.report()
            except Exception:  # noqa: BLE001 - a failed beat (database busy) is retried at the next one
                log.exception("heartbeat")

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)

    def beat(self) -> None:
        a = self.attempt
        with a.store.session() as db:
            owned = db.execute(update(Job).where(Job.id == a.job_id, Job.lease == a.lease)
                               .values(heartbeat_at=time.time())).rowcount
            flags = db.execute(select(Job.cancel_requested, Job.pause_requested).where(Job.id == a.job_id)).first()
        if not owned:
            log.warning("%s: the lease went to another attempt; this one stops now", a.job_id)
            os._exit(EXIT_SUPERSEDED)  # write nothing more: the job belongs to the other attempt
        if flags and (flags[0] or flags[1]) and not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)  # the training loop stops after its step, with a checkpoint

    def report(self) -> None:
        """New metrics lines -> metrics events; new whole checkpoints -> checkpoints; the resolved config."""
        from tunelab.training.checkpoint import complete_checkpoints

        a = self.attempt
        run = a.run_dir()
        if run is None:
            return
        with self.lock, a.store.session() as db:
            job = db.get(Job, a.job_id)
            if job is None or job.lease != a.lease:
                return
            if job.run_dir is None:
                job.run_dir = str(run)
            config = run / "config.json"
            if config.is_file() and hyperparameters_pending(job.method):
                job.method = resolved_method(job.method, json.loads(config.read_text()))
            records = step_records(run / "metrics.jsonl")
            for step, record in sorted(records.items()):
                if step > job.reported_step and "loss" in record:
                    data = metrics_data(record)
                    a.store.event(db, job.id, metrics_message(data), type_="metrics", data=data)
                    job.reported_step = step
            if records:
                last = records[max(records)]
                seconds = [r["seconds"] for r in records.values() if "seconds" in r]
                total = last.get("total_steps")
                if seconds and total:
                    job.estimated_finish = now() + int(sum(seconds) / len(seconds) * (total - max(records)))
            known = set(db.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job.id)))
            on_disk = {_checkpoint_step(path): path for path in complete_checkpoints(run)}
            gone = known - set(on_disk)  # the run keeps its newest few (train.keep_checkpoints): list what is kept
            if gone:
                db.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number.in_(gone)))
            for step in on_disk:
                if step not in known:
                    db.add(Checkpoint(id=new_id("ftckpt_"), job_id=job.id, created_at=now(),
                                      step_number=step, metrics=metrics_data(records.get(step, {"step": step}))))


# ------------------------------------------------------------------------------------------------------ helpers
def step_records(path: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by step (a validation line merged into its step's line); a half-written last line skipped."""
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.setdefault(record["step"], {}).update(record)
    return records


def metrics_data(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's metrics event `data` from a metrics line: step, total_steps, train_loss, valid_loss, ..."""
    data = {"step": record.get("step"), "total_steps": record.get("total_steps"), "train_loss": record.get("loss")}
    if "val_loss" in record:
        data["valid_loss"] = record["val_loss"]
    if "val_token_accuracy" in record:
        data["valid_mean_token_accuracy"] = record["val_token_accuracy"]
    return {k: v for k, v in data.items() if v is not None}


def metrics_message(data: dict[str, Any]) -> str:
    """`Step 30/120: training loss=0.82, validation loss=0.91`, as OpenAI words it."""
    total = f"/{data['total_steps']}" if "total_steps" in data else ""
    parts = [f"training loss={data['train_loss']:.4f}"]
    if "valid_loss" in data:
        parts.append(f"validation loss={data['valid_loss']:.4f}")
    return f"Step {data['step']}{total}: " + ", ".join(parts)


def metrics_csv(path: Path) -> bytes:
    """The result file OpenAI describes: step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy
    (blank where a step had no such figure; tunelab does not measure training token accuracy)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
    for step, record in sorted(step_records(path).items()):
        if "loss" in record:
            writer.writerow([step, record["loss"], "", record.get("val_loss", ""), record.get("val_token_accuracy", "")])
    return out.getvalue().encode()


def trained_tokens(path: Path) -> int:
    return int(sum(r.get("tokens", 0) for r in step_records(path).values() if "loss" in r))


def hyperparameters_pending(method: dict[str, Any]) -> bool:
    hp = method.get(method["type"], {}).get("hyperparameters", {})
    return any(v == "auto" for v in hp.values())


def resolved_method(method: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The job's method with each "auto" replaced by the value the run used (its resolved config.json)."""
    train = config.get("train", {})
    epochs = train.get("epochs")
    values = {"n_epochs": int(epochs) if isinstance(epochs, float) and epochs.is_integer() else epochs,
              "batch_size": train.get("batch_size"),
              "learning_rate_multiplier": train.get("learning_rate_multiplier", 1.0),
              "beta": config.get("dpo", {}).get("beta")}
    section = dict(method.get(method["type"], {}))
    hp = {k: (values.get(k) if v == "auto" else v) for k, v in section.get("hyperparameters", {}).items()}
    return {**method, method["type"]: {**section, "hyperparameters": hp}}


def _newest_checkpoint(run: Path) -> Path:
    from tunelab.training.checkpoint import complete_checkpoints

    return complete_checkpoints(run)[-1]


def _checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _error_param(exc: TunelabError, data_path: Path | None) -> str | None:
    where = exc.where or ""
    return "training_file" if data_path is not None and str(data_path) in where else None


def _error_code(exc: TunelabError, data_path: Path | None) -> str:
    return "invalid_training_file" if _error_param(exc, data_path) else "training_error"


def _evaluation_lines(summary: Any) -> list[str]:
    """The evaluation against the base, one event per contender and comparison."""
    if summary is None:
        return []
    lines = [f"Evaluation on {summary.test_rows} held-out rows ({summary.metric}):"]
    for name, c in summary.contenders.items():
        ci = f" [{c.ci[0]:.4g}, {c.ci[1]:.4g}]" if c.ci else ""
        lines.append(f"  {name}: {'n/a' if c.value is None else f'{c.value:.4g}'}{ci}")
    for name, c in summary.comparisons.items():
        lines.append(f"  {name}: {c.delta:+.4g}, p={c.p_value:.3g}{' (significant)' if c.significant else ''}")
    return ["\n".join(lines)]


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tunelab")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    root.propagate = False


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
