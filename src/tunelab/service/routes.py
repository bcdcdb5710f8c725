"""OpenAI's files, fine-tuning and model-deletion routes, mounted on the serving app (serve/app.py).

    POST   /v1/files                                  multipart upload (file, purpose), streamed to disk
    GET    /v1/files  /v1/files/{id}  /v1/files/{id}/content          DELETE /v1/files/{id}
    POST   /v1/fine_tuning/jobs                       create (extra_body: tunelab={...}, dry_run=true)
    GET    /v1/fine_tuning/jobs  /v1/fine_tuning/jobs/{id}
    POST   /v1/fine_tuning/jobs/{id}/cancel  /pause  /resume
    GET    /v1/fine_tuning/jobs/{id}/events [?stream=true]  /v1/fine_tuning/jobs/{id}/checkpoints
    DELETE /v1/models/{model}                         a fine-tuned model of the caller's project

Every object belongs to a project; another project's id answers exactly as an unknown one does (404 on
a path, 400 "does not exist" in a body), so nobody learns that it exists. Lists page as the SDK's
cursor pages expect: `after` is the last id seen, `has_more` is always present (an SDK loop stops on it).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import delete, func, select, tuple_
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from tunelab.errors import TunelabError
from tunelab.registry import Registry
from tunelab.serve.protocol import ApiError, validation_error
from tunelab.service.files import (
    RESULTS_PURPOSE,
    UPLOAD_PURPOSES,
    Storage,
    TooLarge,
    processing_outcome,
    save_stream,
    validation_report,
)
from tunelab.service.jobs import (
    CreateJobRequest,
    check_servable,
    check_tunelab_keys,
    checkpoint_object,
    event_object,
    job_object,
    model_name,
    run_config,
)
from tunelab.service.keys import Principal, any_keys
from tunelab.service.store import (
    ACTIVE,
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    TERMINAL,
    VALIDATING,
    Checkpoint,
    File,
    FineTunedModel,
    Job,
    JobEvent,
    Project,
    Store,
    new_id,
    now,
)
from tunelab.service.supervisor import Supervisor

STOP_WAIT_S = 15.0  # cancel / pause answer once the worker stopped, or after this long with the status so far
EVENTS_POLL_S = 0.5  # the event stream looks for new events this often
MAX_LINT_EVENTS = 20  # lint findings sent as warn events; the rest are counted in one more
METADATA_RE = re.compile(r"metadata\[(.+)\]")


@dataclass
class Service:
    store: Store
    storage: Storage
    supervisor: Supervisor | None
    base: str  # the served base: the only model a job may fine-tune
    max_upload_bytes: int
    checkpoint_every: int
    default_project: str  # the id of the project `default`: the open server's, and --api-key keys'
    registry: Registry | None = None  # where a fine-tune may be published (`tunelab models register RUN_DIR`)
    max_lora_rank: int = 16  # the serving slots' rank: a job training a higher one is refused at creation
    _closed: bool = False  # a key exists (then it always will: a revoked key still counts)
    _checked_at: float = -1.0
    _recent: dict[str, collections.deque] = field(default_factory=dict)  # key id -> request times (rpm limit)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keys_exist(self) -> bool:
        """Whether the store holds a key: looked up at most once a second until one exists, then never again."""
        if not self._closed and time.monotonic() - self._checked_at > 1.0:
            self._closed, self._checked_at = any_keys(self.store), time.monotonic()
        return self._closed

    def rate_limit(self, principal: Principal) -> None:
        """429 with Retry-After once a key made `requests_per_minute` requests in the last 60 s."""
        limit = principal.requests_per_minute
        if not limit or principal.key_id is None:
            return
        t = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(principal.key_id, collections.deque())
            while recent and recent[0] <= t - 60:
                recent.popleft()
            if len(recent) >= limit:
                wait = 60 - (t - recent[0])
                raise ApiError.too_many_requests(wait, f"Rate limit reached: {limit} requests per minute for this "
                                                       f"key; retry after {wait:.0f} s.")
            recent.append(t)


def mount(app: FastAPI, service: Service, authenticate) -> None:  # noqa: ANN001, C901 - the routes, one by one
    """Add the service's routes to `app`; `authenticate(request)` gives the caller's Principal or raises 401."""

    def who(request: Request) -> Principal:
        principal = authenticate(request)
        service.rate_limit(principal)
        return principal

    # ------------------------------------------------------------------------------------------------ files
    @app.post("/v1/files")
    async def create_file(request: Request) -> dict:
        p = who(request)
        limit = service.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise _too_large(limit)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError.bad_request("upload the file as multipart/form-data with the fields `file` and `purpose`",
                                       param="file")

        async def capped():
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit + 64 * 1024:  # the form's own fields and boundaries on top of the file
                    raise TooLarge(seen)
                yield chunk

        try:
            form = await MultiPartParser(request.headers, capped(), max_files=1, max_fields=8).parse()
        except TooLarge:
            raise _too_large(limit) from None
        except MultiPartException as exc:
            raise ApiError.bad_request(f"the multipart body could not be read: {exc.message}", param="file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError.bad_request("the form has no `file` part", param="file")
            if purpose not in UPLOAD_PURPOSES:
                raise ApiError.bad_request(f"purpose {purpose!r} is not one of {', '.join(UPLOAD_PURPOSES)}",
                                           param="purpose")
            filename = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
            if purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
                raise ApiError.bad_request(f"a fine-tune file must be JSON Lines with the suffix .jsonl, not "
                                           f"{filename!r}", param="file")

            async def chunks():
                while block := await upload.read(1 << 20):
                    yield block

            try:
                tmp, size = await save_stream(chunks(), service.storage, limit)
            except TooLarge:
                raise _too_large(limit) from None
        finally:
            await form.close()
        file_id = new_id("file-")
        path = service.storage.file(file_id)
        tmp.rename(path)
        status, details, report = "uploaded", None, None
        if purpose == "fine-tune":
            status, details, report = await asyncio.to_thread(
                lambda: processing_outcome(validation_report(path, filename)))
        record = File(id=file_id, project_id=p.project_id, filename=filename, purpose=purpose, bytes=size,
                      created_at=now(), status=status if purpose == "fine-tune" else "processed",
                      status_details=details, report=report, job_id=None)
        with service.store.session() as db:
            db.add(record)
        return _file_object(record)

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, order: str = "desc",
                         after: str | None = None) -> dict:
        p = who(request)
        limit = _limit(limit, 10000)
        if order not in ("asc", "desc"):
            raise ApiError.bad_request("order must be 'asc' or 'desc'", param="order")
        with service.store.session() as db:
            q = select(File).where(File.project_id == p.project_id)
            if purpose is not None:
                q = q.where(File.purpose == purpose)
            key = tuple_(File.created_at, File.id)
            if after is not None:
                anchor = db.get(File, after)
                if anchor is None or anchor.project_id != p.project_id:
                    raise ApiError.bad_request(f"after: no file {after!r}", param="after")
                q = q.where(key < (anchor.created_at, anchor.id) if order == "desc"
                            else key > (anchor.created_at, anchor.id))
            q = q.order_by(File.created_at.desc(), File.id.desc()) if order == "desc" else q.order_by(
                File.created_at, File.id)
            rows = list(db.scalars(q.limit(limit + 1)))
        page, more = rows[:limit], len(rows) > limit
        return {"object": "list", "data": [_file_object(f) for f in page], "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None, "has_more": more}

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> dict:
        p = who(request)
        with service.store.session() as db:
            return _file_object(_own_file(db, p, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        p = who(request)
        with service.store.session() as db:
            record = _own_file(db, p, file_id)
        data = await asyncio.to_thread(service.storage.file(record.id).read_bytes)
        media = {".csv": "text/csv", ".json": "application/json", ".html": "text/html"}.get(
            "." + record.filename.rsplit(".", 1)[-1], "application/octet-stream")
        return Response(data, media_type=media)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> dict:
        p = who(request)
        with service.store.session() as db:
            record = _own_file(db, p, file_id)
            using = db.scalar(select(Job.id).where(
                Job.project_id == p.project_id, Job.status.in_(ACTIVE),
                (Job.training_file == file_id) | (Job.validation_file == file_id)).limit(1))
            if using is not None:
                raise ApiError(409, f"file {file_id} is used by the job {using}, which has not finished; cancel the "
                                    "job or wait for it", param="file_id", code="file_in_use")
            db.delete(record)
        service.storage.file(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------------------------------------- jobs
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict:
        p = who(request)
        body = await _json_body(request)
        try:
            params = CreateJobRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        if params.model != service.base:
            raise ApiError.bad_request(f"the model {params.model!r} cannot be fine-tuned here: this server fine-tunes "
                                       f"its base model, {service.base!r}", param="model",
                                       code="model_not_available")
        method = params.resolved_method()
        with service.store.session() as db:
            training = _body_file(db, p, params.training_file, "training_file")
            validation = (_body_file(db, p, params.validation_file, "validation_file")
                          if params.validation_file else None)
            if p.max_active_jobs is not None and p.key_id is not None:
                active = db.scalar(select(func.count()).select_from(Job).where(Job.key_id == p.key_id,
                                                                               Job.status.in_(ACTIVE)))
                if active >= p.max_active_jobs:
                    raise ApiError.too_many_requests(30.0, f"this key may have {p.max_active_jobs} unfinished job(s) "
                                                           "at once; wait for one to finish or cancel one")
            project_name = db.scalar(select(Project.name).where(Project.id == p.project_id))
        seed = params.seed if params.seed is not None else secrets.randbelow(2**31)  # OpenAI draws one too
        job = Job(id=new_id("ftjob-"), project_id=p.project_id, key_id=p.key_id, created_at=now(), status=VALIDATING,
                  model=params.model, training_file=training.id,
                  validation_file=validation.id if validation else None, suffix=params.suffix, seed=seed,
                  method=method.model_dump(exclude_none=True), metadata_=params.metadata,
                  tunelab=params.tunelab or {}, error=None, fine_tuned_model=None, finished_at=None,
                  estimated_finish=None, trained_tokens=None, result_files=[], attempt=0, cancel_requested=False,
                  pause_requested=False, reported_step=0)
        try:
            check_tunelab_keys(job.tunelab)
            cfg = run_config(job, service.storage.file(training.id), service.storage.job_dir(job.id), service.base,
                             service.checkpoint_every)
            check_servable(cfg, service.max_lora_rank)
        except TunelabError as exc:
            raise ApiError.bad_request(f"tunelab: {exc}", param="tunelab") from None
        if params.dry_run:
            return await asyncio.to_thread(_dry_run, cfg, training)
        with service.store.session() as db:
            db.add(job)
            service.store.event(db, job.id, f"Validating training file: {training.id}")
        await asyncio.to_thread(_validate_job, service, job.id, training, validation, project_name)
        if service.supervisor is not None:
            service.supervisor.wake()
        with service.store.session() as db:
            return job_object(db.get(Job, job.id), project_name, service.base)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict:
        p = who(request)
        limit = _limit(limit, 100)
        wanted = {m.group(1): v for k, v in request.query_params.items() if (m := METADATA_RE.fullmatch(k))}
        with service.store.session() as db:
            jobs = list(db.scalars(select(Job).where(Job.project_id == p.project_id)
                                   .order_by(Job.created_at.desc(), Job.id.desc())))
        if wanted:
            jobs = [j for j in jobs if all((j.metadata_ or {}).get(k) == v for k, v in wanted.items())]
        if after is not None:
            index = next((i for i, j in enumerate(jobs) if j.id == after), None)
            if index is None:
                raise ApiError.bad_request(f"after: no job {after!r}", param="after")
            jobs = jobs[index + 1:]
        page = jobs[:limit]
        return {"object": "list", "data": [job_object(j, p.project, service.base) for j in page],
                "has_more": len(jobs) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, request: Request) -> dict:
        p = who(request)
        with service.store.session() as db:
            return job_object(_own_job(db, p, job_id), p.project, service.base)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request) -> dict:
        return await _stop(who(request), job_id, "cancel")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str, request: Request) -> dict:
        return await _stop(who(request), job_id, "pause")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(job_id: str, request: Request) -> dict:
        p = who(request)
        with service.store.session() as db:
            job = _own_job(db, p, job_id)
            if job.status != PAUSED:
                raise ApiError(409, f"job {job_id} is {job.status}; only a paused job can be resumed",
                               param="fine_tuning_job_id", code="invalid_job_state")
            job.status, job.pause_requested = QUEUED, False
            service.store.event(db, job.id, "Fine-tuning job resumed: queued to continue from its checkpoint")
        if service.supervisor is not None:
            service.supervisor.wake()
        with service.store.session() as db:
            return job_object(db.get(Job, job_id), p.project, service.base)

    async def _stop(p: Principal, job_id: str, action: str) -> dict:
        with service.store.session() as db:
            job = _own_job(db, p, job_id)
            if job.status in TERMINAL or (action == "pause" and job.status == PAUSED):
                if action == "pause" and job.status == PAUSED:
                    return job_object(job, p.project, service.base)
                raise ApiError(409, f"job {job_id} is already {job.status}", param="fine_tuning_job_id",
                               code="invalid_job_state")
            if job.status == RUNNING:
                if action == "cancel":
                    job.cancel_requested = True
                else:
                    job.pause_requested = True
                service.store.event(db, job.id, f"{action.capitalize()} requested: stopping at the next step")
            elif action == "cancel":  # not started (or paused): nothing runs, it ends now
                job.status, job.finished_at, job.cancel_requested = CANCELLED, now(), True
                service.store.event(db, job.id, "Fine-tuning job cancelled")
            else:
                job.status = PAUSED
                service.store.event(db, job.id, "Fine-tuning job paused before it started")
        deadline = time.monotonic() + STOP_WAIT_S
        while True:  # answer with the stopped job when the worker stops soon, as OpenAI's answer shows it
            with service.store.session() as db:
                job = db.get(Job, job_id)
                if job.status != RUNNING or time.monotonic() > deadline:
                    return job_object(job, p.project, service.base)
            await asyncio.sleep(0.2)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, request: Request, after: str | None = None, limit: int = 20,
                          stream: bool = False):
        p = who(request)
        with service.store.session() as db:
            _own_job(db, p, job_id)
        if stream:
            last = request.headers.get("last-event-id") or after
            return _event_stream(service, job_id, _event_seq(last) if last else 0)
        limit = _limit(limit, 1000)
        with service.store.session() as db:
            q = select(JobEvent).where(JobEvent.job_id == job_id)
            if after is not None:
                q = q.where(JobEvent.seq < _event_seq(after))
            rows = list(db.scalars(q.order_by(JobEvent.seq.desc()).limit(limit + 1)))
        return {"object": "list", "data": [event_object(e) for e in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10) -> dict:
        p = who(request)
        limit = _limit(limit, 100)
        with service.store.session() as db:
            job = _own_job(db, p, job_id)
            q = select(Checkpoint).where(Checkpoint.job_id == job_id)
            if after is not None:
                anchor = db.get(Checkpoint, after)
                if anchor is None or anchor.job_id != job_id:
                    raise ApiError.bad_request(f"after: no checkpoint {after!r}", param="after")
                q = q.where(Checkpoint.step_number < anchor.step_number)
            rows = list(db.scalars(q.order_by(Checkpoint.step_number.desc()).limit(limit + 1)))
        name = model_name(job.model, p.project, job.suffix, job.id)
        page = rows[:limit]
        return {"object": "list", "data": [checkpoint_object(c, f"{name}:ckpt-step-{c.step_number}") for c in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(rows) > limit}

    # ----------------------------------------------------------------------------------------------- models
    @app.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str, request: Request) -> dict:
        p = who(request)
        with service.store.session() as db:
            model = db.get(FineTunedModel, model_id)
            if model is None or model.project_id != p.project_id:
                if model_id == service.base:
                    raise ApiError.bad_request("the base model cannot be deleted", param="model")
                raise ApiError.model_not_found(model_id)
            aliases = await asyncio.to_thread(_published_aliases, service.registry, model.run_dir)
            if aliases:
                raise ApiError(409, f"{model_id} is published in the registry and {', '.join(aliases)} points at it: "
                                    "move the alias (`tunelab models promote` another version, or `tunelab models "
                                    "rollback`) before deleting it", param="model", code="model_in_use")
            db.execute(delete(FineTunedModel).where(FineTunedModel.id == model_id))
        return {"id": model_id, "object": "model", "deleted": True}


# ------------------------------------------------------------------------------------------------------- helpers
def _published_aliases(registry: Registry | None, run_dir: str) -> list[str]:
    """NAME@ALIAS of each registry alias on a version registered from `run_dir`."""
    if registry is None:
        return []
    target = Path(run_dir).resolve()
    return [f"{v.name}@{alias}" for v in registry.versions()
            if Path(str(v.record.get("source", ""))).resolve() == target for alias in v.aliases]


def _file_object(f: File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "expires_at": None,
            "filename": f.filename, "purpose": f.purpose, "status": f.status, "status_details": f.status_details}


def _own_file(db, p: Principal, file_id: str) -> File:  # noqa: ANN001
    record = db.get(File, file_id)
    if record is None or record.project_id != p.project_id:
        raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return record


def _body_file(db, p: Principal, file_id: str, param: str) -> File:  # noqa: ANN001
    record = db.get(File, file_id)
    if record is None or record.project_id != p.project_id:
        raise ApiError.bad_request(f"{param}: the file {file_id!r} does not exist", param=param,
                                   code="invalid_file")
    if record.purpose != "fine-tune":
        raise ApiError.bad_request(f"{param}: the file {file_id} was uploaded with purpose {record.purpose!r}; "
                                   "upload it again with purpose 'fine-tune'", param=param, code="invalid_file")
    return record


def _own_job(db, p: Principal, job_id: str) -> Job:  # noqa: ANN001
    job = db.get(Job, job_id)
    if job is None or job.project_id != p.project_id:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
    return job


def _limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise ApiError.bad_request(f"limit must be between 1 and {most}", param="limit")
    return limit


def _event_seq(event_id: str) -> int:
    digits = event_id.removeprefix("ftevent-")
    if not digits.isdigit():
        raise ApiError.bad_request(f"not an event id: {event_id!r}", param="after")
    return int(digits)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the file is larger than this server's limit of {limit} bytes (max_upload_bytes)",
                    param="file", code="file_too_large")


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError.bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError.bad_request("the request body must be a JSON object")
    return body


def _validate_job(service: Service, job_id: str, training: File, validation: File | None, project: str) -> None:
    """The validating_files stage: a file with errors fails the job (first bad line and count, the full report
    as a result file); lint findings become warn events; then the job is queued."""
    from tunelab.data.quality.lint import lint_report

    storage, store = service.storage, service.store
    with store.session() as db:
        job = db.get(Job, job_id)
        for param, f in (("training_file", training), ("validation_file", validation)):
            if f is None or f.status != "error":
                continue
            report_id = new_id("file-")
            data = json.dumps(f.report, indent=2).encode()
            storage.file(report_id).write_bytes(data)
            db.add(File(id=report_id, project_id=job.project_id, filename=f"{f.filename}.validation.json",
                        purpose=RESULTS_PURPOSE, bytes=len(data), created_at=now(), status="processed",
                        status_details=None, report=None, job_id=job.id))
            job.status, job.finished_at, job.result_files = FAILED, now(), [report_id]
            job.error = {"code": "invalid_file", "param": param,
                         "message": f"{f.status_details}; the full report is the file {report_id}"}
            store.event(db, job.id, f"Validation of {f.id} failed: {f.status_details}", level="error")
            return
    train_report = validation_report(storage.file(training.id), training.filename)
    other = validation_report(storage.file(validation.id), validation.filename) if validation else None
    lint = lint_report(train_report, other)
    with store.session() as db:
        job = db.get(Job, job_id)
        for finding in lint.findings[:MAX_LINT_EVENTS]:
            store.event(db, job.id, finding.render(), level="warn", data=finding.as_dict())
        if len(lint.findings) > MAX_LINT_EVENTS:
            store.event(db, job.id, f"... and {len(lint.findings) - MAX_LINT_EVENTS} more lint findings "
                                    "(`tunelab data lint FILE` lists them all)", level="warn")
        if validation is not None:
            store.event(db, job.id, f"{validation.id} is linted against the training file for leakage; the "
                                    "validation rows the training uses are split from the training file")
        if job.status == VALIDATING:  # not cancelled meanwhile
            job.status = QUEUED
            store.event(db, job.id, "Files validated; the job is queued")


def _dry_run(cfg, training: File) -> dict:  # noqa: ANN001
    """Mistral's dry_run: the plan (rows, tokens, steps, seconds measured on this machine, cost, memory)."""
    from tunelab.planning import make_plan

    try:
        plan = make_plan(cfg)
    except TunelabError as exc:
        raise ApiError.bad_request(f"training_file: {exc}", param="training_file") from None
    return {"object": "fine_tuning.job.plan", "training_file": training.id, **plan.model_dump(mode="json")}


def _event_stream(service: Service, job_id: str, after_seq: int) -> StreamingResponse:
    """Server-sent events of a job: those after `after_seq` (Last-Event-ID), then new ones as they come; the
    stream ends once the job has finished and every event was sent. Each event's `id:` is its sequence number,
    so a reconnecting EventSource resumes where it stopped."""

    async def body():
        last = after_seq
        while True:
            with service.store.session() as db:
                rows = list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > last)
                                       .order_by(JobEvent.seq)))
                status = db.scalar(select(Job.status).where(Job.id == job_id))
            for e in rows:
                last = e.seq
                yield f"id: {e.seq}\ndata: {json.dumps(event_object(e))}\n\n"
            if status in TERMINAL or status is None:
                return
            await asyncio.sleep(EVENTS_POLL_S)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
