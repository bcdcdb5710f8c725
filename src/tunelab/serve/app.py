"""The OpenAI-compatible HTTP API: routes, admission, chat template, tokens to text, streaming.

    GET  /v1/models, /v1/models/{id}     the base and every servable adapter (serve/catalog.py)
    POST /v1/chat/completions            messages -> the model's chat template -> the engine
    POST /v1/completions                 a raw prompt -> the engine
    GET  /health, /metrics               liveness; Prometheus text (serve/metrics.py)

Everything a client sends is checked here, in this order, so the cheap refusals come first and an
overloaded server spends nothing on a request it cannot take: the API key, the body's size, the
queue (429 with Retry-After), the body's fields (400 naming each problem, never FastAPI's 422),
the model (404), the prompt's length and max_tokens (400 naming the limit). Errors have OpenAI's
shape (`{"error": {"message", "type", "param", "code"}}`, serve/protocol.py); no input gives a 500.
The engine runs on its own thread (serve/engine.py); requests talk to it through `Request.on_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.config import ServeConfig
from tunelab.data.records import Message
from tunelab.data.tokenize import render_prompt
from tunelab.serve import engine as eng
from tunelab.serve.catalog import Catalog, NotServable, Servable, UnknownModel
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.protocol import (
    SSE_DONE,
    ApiError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Model,
    ModelList,
    Usage,
    new_id,
    sse,
    validation_error,
)
from tunelab.serve.structured import BadFormat, Grammars
from tunelab.serve.text import TextPieces
from tunelab.service.keys import DEFAULT_PROJECT, Principal, principal_for
from tunelab.service.routes import Service, mount

log = logging.getLogger("tunelab.serve")
RETRY_AFTER_S = 1.0  # what a 429 asks the client to wait: about the time a few rows take to finish


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: eng.Engine
    catalog: Catalog
    metrics: ServeMetrics
    max_model_len: int  # positions the base model has: prompt + answer must fit
    grammars: Grammars  # response_format json_object / json_schema
    service: Service | None = None  # files and fine-tuning jobs (tunelab/service/), and the store's keys
    mailbox: _Mailbox | None = None  # the engine's events into the event loop serving this state (set on first use)


@dataclass(frozen=True)
class _Job:
    """One request on its way to the engine, after every check passed."""

    name: str  # as the request said it (echoed back)
    servable: Servable
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    constraint: eng.Constraint | None = None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tunelab = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "unknown_url" if exc.status_code == 404 else None  # as OpenAI answers an unknown path
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = ApiError.server_error(f"internal error: {type(exc).__name__}")
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": state.engine.running(), "waiting": state.engine.waiting()}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        _authenticate(state, request)  # its labels name models, fine-tunes of every project among them
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        who = _authenticate(state, request)
        listed = await asyncio.to_thread(state.catalog.listed, who.project_id)
        return ModelList(data=[_model_card(state, name, created) for name, created in listed]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        who = _authenticate(state, request)
        servable = await _resolve(state, model_id, who)
        return _model_card(state, model_id, servable.created).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        who, body = await _admitted_body(state, request)
        params = _parse(ChatCompletionRequest, body)
        servable = await _resolve(state, params.model, who)
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in params.messages]
        if servable.system_prompt and messages[0].role != "system":
            messages.insert(0, Message("system", servable.system_prompt))  # as in training (data/read.py)
        try:
            prompt = render_prompt(servable.tokenizer, messages)  # the template, exactly as training rendered it
        except Exception as exc:  # the template refused this conversation (e.g. roles it does not allow)
            raise ApiError.bad_request(f"the model's chat template cannot render these messages: {exc}",
                                       param="messages") from None
        max_param = "max_completion_tokens" if params.max_completion_tokens is not None else "max_tokens"
        constraint = await _json_constraint(state, params, servable)
        return await _answer(state, params, servable, list(prompt), max_param, chat=True, constraint=constraint)

    @app.post("/v1/completions")
    async def completions(request: Request):
        who, body = await _admitted_body(state, request)
        params = _parse(CompletionRequest, body)
        servable = await _resolve(state, params.model, who)
        text = params.prompt if isinstance(params.prompt, str) else params.prompt[0]
        prompt = servable.tokenizer(text)["input_ids"]
        if not prompt:
            raise ApiError.bad_request("the prompt is empty", param="prompt")
        return await _answer(state, params, servable, list(prompt), "max_tokens", chat=False)

    if state.service is not None:
        mount(app, state.service, lambda request: _authenticate(state, request))
    return app


# ---------------------------------------------------------------------- checks, in the order they run
def _authenticate(state: ServerState, request: Request) -> Principal:
    """Who the request acts for: a key of the store (its project), a key given with --api-key (the project
    `default`), or, while no key exists anywhere, anyone (the project `default`); else 401."""
    service = state.service
    open_project = Principal(service.default_project if service else DEFAULT_PROJECT, DEFAULT_PROJECT, None)
    closed = bool(state.cfg.api_keys) or (service is not None and service.keys_exist())
    if not closed:
        return open_project
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if given and any(hmac.compare_digest(given.encode(), key.encode()) for key in state.cfg.api_keys):
        return open_project
    if given and service is not None:
        principal = principal_for(service.store, given)
        if principal is not None:
            return principal
    raise ApiError(401, "Incorrect API key provided: send a key from `tunelab keys create` (or one of the server's "
                        "--api-key options) as `Authorization: Bearer KEY` (the SDK's api_key).",
                   "invalid_request_error", code="invalid_api_key")


async def _admitted_body(state: ServerState, request: Request) -> tuple[Principal, object]:
    """Who asks, and the request's JSON, after the key, the size and the queue have let it in."""
    who = _authenticate(state, request)
    if state.service is not None:
        state.service.rate_limit(who)
    limit = state.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError.bad_request(f"the request body has {declared} bytes, over the limit of {limit}")
    if state.engine.queue_full():
        state.metrics.rejected.inc()
        raise ApiError.too_many_requests(RETRY_AFTER_S)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError.bad_request(f"the request body is over the limit of {limit} bytes")
    try:
        return who, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError.bad_request(f"the request body is not valid JSON: {exc}") from None


def _parse(model: type[BaseModel], body: object):
    if not isinstance(body, dict):
        raise ApiError.bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def _resolve(state: ServerState, name: str, who: Principal) -> Servable:
    try:
        fixed = state.catalog.fixed(name)  # the base, a run directory already checked: no I/O
        if fixed is not None:
            return fixed
        # Reads the registry (SQLite) and, the first time, the adapter's files: off the event loop.
        return await asyncio.to_thread(state.catalog.resolve, name, who.project_id)
    except UnknownModel:
        raise ApiError.model_not_found(name) from None
    except NotServable as exc:
        raise ApiError.bad_request(f"the model `{name}` cannot be served: {exc}", param="model",
                                   code="model_not_servable") from None


async def _json_constraint(state: ServerState, params: ChatCompletionRequest,
                           servable: Servable) -> eng.Constraint | None:
    fmt = params.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" and not any("json" in m.text().lower() for m in params.messages):
        # OpenAI's rule, and for the same reason: a model not told to answer in JSON, forced into it,
        # tends to fill the answer with whitespace until max_tokens.
        raise ApiError.bad_request("'messages' must contain the word 'json' in some form, to use 'response_format' "
                                   "of type 'json_object'", param="messages")
    try:  # the first request for a tokenizer builds llguidance's view of it (about a second): off the loop
        return await asyncio.to_thread(state.grammars.constraint, fmt, servable.tokenizer, servable.stop_token_ids)
    except BadFormat as exc:
        raise ApiError.bad_request(str(exc), param="response_format") from None


async def _answer(state: ServerState, params, servable: Servable, prompt: list[int], max_param: str, chat: bool,
                  constraint: eng.Constraint | None = None):
    """Check the limits, then answer whole or as a stream."""
    # max_tokens unset: the server's default, within what the context leaves (as vLLM does).
    room = min(state.cfg.default_max_tokens, max(1, state.max_model_len - len(prompt)))
    job = _job(state, params.model, servable, prompt, params.max_new_tokens(room), params, max_param, constraint)
    if params.stream:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        return _stream(state, job, chat=chat, include_usage=include_usage)
    return await _complete(state, job, chat=chat)


def _job(state: ServerState, name: str, servable: Servable, prompt: list[int], max_new_tokens: int, params,
         max_param: str, constraint: eng.Constraint | None) -> _Job:
    cfg = state.cfg
    if len(prompt) > cfg.max_prompt_tokens:
        raise ApiError.bad_request(f"the prompt has {len(prompt)} tokens, over the server's limit of "
                                   f"{cfg.max_prompt_tokens} (max_prompt_tokens)", param="messages")
    if max_new_tokens > cfg.max_tokens:
        raise ApiError.bad_request(f"{max_param} {max_new_tokens} is over the server's limit of {cfg.max_tokens}",
                                   param=max_param)
    if len(prompt) + max_new_tokens > state.max_model_len:
        raise ApiError.bad_request(f"the prompt ({len(prompt)} tokens) plus {max_param} ({max_new_tokens}) is over "
                                   f"the model's context of {state.max_model_len} tokens", param=max_param)
    temperature = 1.0 if params.temperature is None else params.temperature  # OpenAI's default is 1
    top_p = 1.0 if params.top_p is None else params.top_p
    return _Job(name, servable, prompt, max_new_tokens, temperature, top_p, params.seed, params.stop_list, constraint)


# ---------------------------------------------------------------------- running a request
class _Mailbox:
    """Events from the engine thread into one event loop, with one wake-up of the loop per batch of events.

    A decode step sends a token to every running request; waking the loop once per token (one
    `call_soon_threadsafe` each) costs a system call per row per step on the engine's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, eng.Event]] = []

    def post(self, queue: asyncio.Queue, event: eng.Event) -> None:  # on the engine thread
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a wake-up is already on its way
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # on the event loop
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


@dataclass
class _Submitted:
    request: eng.Request
    queue: asyncio.Queue
    deadline: float  # loop time


def _submit(state: ServerState, job: _Job) -> _Submitted:
    """Hand the job to the engine (429 when its queue is full); before any response has started."""
    queue: asyncio.Queue[eng.Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    if state.mailbox is None or state.mailbox.loop is not loop:
        state.mailbox = _Mailbox(loop)
    mailbox = state.mailbox
    request = eng.Request(job.prompt, job.servable.adapter, job.max_new_tokens, job.servable.stop_token_ids,
                          lambda event: mailbox.post(queue, event), job.temperature, job.top_p, job.seed,
                          job.constraint)
    try:
        state.engine.submit(request)
    except eng.QueueFull:
        state.metrics.rejected.inc()
        raise ApiError.too_many_requests(RETRY_AFTER_S) from None
    return _Submitted(request, queue, loop.time() + state.cfg.request_timeout)


async def _events(state: ServerState, submitted: _Submitted) -> AsyncIterator[eng.Event]:
    """The engine's events for a submitted job, until it finishes; cancels the engine's row when the caller
    stops listening (a disconnected client, a stop string) or the request times out."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                left = max(0.0, submitted.deadline - loop.time())
                event = await asyncio.wait_for(submitted.queue.get(), timeout=left)
            except TimeoutError:
                yield eng.Failed(f"the request took longer than request_timeout ({state.cfg.request_timeout:g} s)",
                                 408)
                return
            yield event
            if not isinstance(event, eng.Tokens):
                return
    finally:
        submitted.request.cancelled = True  # a no-op once finished; else the engine frees the row at its next step


async def _complete(state: ServerState, job: _Job, chat: bool) -> dict:
    pieces = TextPieces(job.servable.tokenizer, job.stops)
    started = time.monotonic()
    timer = state.metrics.request_timer(job.name)
    finished: eng.Finished | None = None
    # aclosing: leaving early (a stop string) runs _events' `finally`, which frees the engine's row at once
    async with contextlib.aclosing(_events(state, _submit(state, job))) as events:
        async for event in events:
            if isinstance(event, eng.Tokens):
                timer.tokens(len(event.ids))
                pieces.add(event.ids)
                if pieces.stopped:
                    break
            elif isinstance(event, eng.Finished):
                finished = event
            else:
                timer.done("error")
                raise ApiError(event.status, event.message, "server_error")
    text = pieces.text
    reason = "stop" if pieces.stopped or finished is None else finished.reason
    completion_tokens = len(pieces.ids)
    usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=completion_tokens,
                  total_tokens=len(job.prompt) + completion_tokens)
    timer.done(reason)
    created = int(time.time())
    log.debug("%s: %d tokens in %.2f s", job.name, completion_tokens, time.monotonic() - started)
    if chat:
        return ChatCompletion(
            id=new_id("chatcmpl-"), created=created, model=job.name,
            choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            usage=usage,
        ).model_dump()
    return Completion(id=new_id("cmpl-"), created=created, model=job.name,
                      choices=[{"index": 0, "text": text, "finish_reason": reason}], usage=usage).model_dump()


def _stream(state: ServerState, job: _Job, chat: bool, include_usage: bool) -> StreamingResponse:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, the usage chunk
    when asked for (`stream_options.include_usage`), then `data: [DONE]`."""
    response_id, created = new_id("chatcmpl-" if chat else "cmpl-"), int(time.time())
    submitted = _submit(state, job)  # a full queue is still a 429, not a stream that fails

    def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            return sse(ChatCompletionChunk(id=response_id, created=created, model=job.name,
                                           choices=[{"index": 0, "delta": delta, "finish_reason": reason}]))
        return sse(Completion(id=response_id, created=created, model=job.name,
                              choices=[{"index": 0, "text": text or "", "finish_reason": reason}]))

    async def body() -> AsyncIterator[str]:
        pieces = TextPieces(job.servable.tokenizer, job.stops)
        timer = state.metrics.request_timer(job.name)
        reason = "stop"
        if chat:
            yield chunk(None, None, first=True)
        async with contextlib.aclosing(_events(state, submitted)) as events:
            async for event in events:
                if isinstance(event, eng.Tokens):
                    timer.tokens(len(event.ids))
                    piece = pieces.add(event.ids)
                    if piece:
                        yield chunk(piece, None)
                    if pieces.stopped:
                        break
                elif isinstance(event, eng.Finished):
                    reason = event.reason
                else:  # headers are gone: the error travels as an event, as OpenAI's stream does
                    timer.done("error")
                    yield sse(ApiError(event.status, event.message, "server_error").body())
                    yield SSE_DONE
                    return
        rest = pieces.flush()
        if rest:
            yield chunk(rest, None)
        yield chunk(None, "stop" if pieces.stopped else reason)
        timer.done(reason)
        if include_usage:
            usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=len(pieces.ids),
                          total_tokens=len(job.prompt) + len(pieces.ids))
            cls = ChatCompletionChunk if chat else Completion
            yield sse(cls(id=response_id, created=created, model=job.name, choices=[], usage=usage))
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _model_card(state: ServerState, name: str, created: int) -> Model:
    base = state.catalog.base_name
    return Model(id=name, created=created, owned_by="tunelab", parent=None if name == base else base, root=base)
