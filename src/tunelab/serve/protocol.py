"""The OpenAI wire format the server speaks: request bodies, responses, stream chunks and error envelopes.

Pydantic models of `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`, so that the `openai`
SDK, and strict clients that validate every field, work unchanged against a tunelab server. Fields follow OpenAI's
order (requests: required first, then alphabetical, as the API reference lists them; responses: as the spec's
examples); our own additions are fenced at the end of a model.

Requests accept unknown fields, as OpenAI clients send many we have no use for (`user`, `metadata`, `store`, ...).
A parameter that would change the answer and that we cannot honour (`n`, `logprobs`, `tools`, penalties, ...) is
accepted only at its default; another value is a 400 naming it, never silently ignored. Responses carry explicit nulls
where OpenAI sends them, integer Unix `created` and an `object` tag: strict clients fail without them. Errors are
`{"error": {message, type, param, code}}`; a bad parameter is a 400, never a 500, which the SDK would retry.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

# ---------------------------------------------------------------------------------------------------------- requests


def _only(*allowed: object, fix: str, what: str = "not supported by this server") -> AfterValidator:
    """Accept an OpenAI parameter only at its default values `allowed`; otherwise say so and how to fix it."""

    def check(value: object) -> object:
        if value not in allowed:
            raise ValueError(f"{what}; {fix}")
        return value

    return AfterValidator(check)


# OpenAI documents most parameters as nullable: an explicit null means the default.
_Flag = Annotated[bool, BeforeValidator(lambda value: False if value is None else value)]


def _check_stop(value: object) -> object:
    # Checked by hand so that a bad value gives one message, not one per branch of `str | list[str]`.
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("must be a string or a list of strings")
    if len(value) > 4:  # OpenAI's limit
        raise ValueError(f"at most 4 stop sequences are allowed, got {len(value)}")
    return value


def _stream_options_need_stream(value: object, info: ValidationInfo) -> object:
    # OpenAI answers 400 here too; `stream` is declared before `stream_options`, so it is already in info.data.
    if value is not None and not info.data.get("stream"):
        raise ValueError("stream_options is only allowed when stream is true")
    return value


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage` is honoured (`include_obfuscation` and the like are accepted)."""

    model_config = ConfigDict(extra="allow")

    include_usage: _Flag = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as the SDK's `chat.completions.parse(response_format=Model)` sends it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the answer always follows the schema; `strict` changes nothing here


class ResponseFormat(BaseModel):
    """`response_format`: "text", "json_object" (the answer is one JSON object) or "json_schema" (the answer
    follows the schema). JSON answers are enforced token by token (serve/structured.py), not hoped for."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}')
        return self


_NO_TOOLS = "function calling is not supported by this server"
_N = Annotated[int | None, _only(None, 1, what="this server returns one choice per request", fix="omit n or send 1")]
_FrequencyPenalty = Annotated[float | None, _only(None, 0, fix="omit frequency_penalty or send 0")]
_PresencePenalty = Annotated[float | None, _only(None, 0, fix="omit presence_penalty or send 0")]
_LogitBias = Annotated[dict[str, float] | None, _only(None, {}, fix="omit logit_bias")]
_Limit = Annotated[int | None, Field(ge=1)]
_Temperature = Annotated[float | None, Field(ge=0, le=2)]
_TopP = Annotated[float | None, Field(gt=0, le=1)]
_Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]
_StreamOptions = Annotated[StreamOptions | None, AfterValidator(_stream_options_need_stream)]


class TextPart(BaseModel):
    """One part of a message's content; the only kind this server reads."""

    type: Literal["text"]
    text: str


def _text_parts(value: object) -> object:
    # Checked by hand so that an image part says why it is refused, instead of one error per union branch.
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text":
            raise ValueError(f'part {i} has type {kind!r}; this server reads only {{"type": "text", "text": ...}}')
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} needs a string `text`")
    return value


class ChatMessage(BaseModel):
    """One message of a conversation. Other fields OpenAI defines (`tool_call_id`, `refusal`, ...) are accepted."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart], BeforeValidator(_text_parts)]
    name: str | None = None
    tool_calls: Annotated[list[Any] | None, _only(None, [], what=_NO_TOOLS, fix="omit tool_calls")] = None

    def text(self) -> str:
        """The content as one string: text parts are joined with no separator."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`.

    Honoured: messages, model, max_completion_tokens (else the deprecated max_tokens), temperature, top_p, stop,
    seed, stream, stream_options.include_usage, response_format ("text", "json_object", "json_schema").
    Accepted only at their defaults: n, logprobs, top_logprobs, frequency_penalty, presence_penalty, logit_bias,
    tools, functions (and a message's tool_calls). Anything else (user, metadata, store, tool_choice, ...) is
    accepted and ignored.
    """

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: _FrequencyPenalty = None
    functions: Annotated[list[Any] | None, _only(None, [], what=_NO_TOOLS, fix="omit functions")] = None
    logit_bias: _LogitBias = None
    logprobs: Annotated[bool | None, _only(None, False, fix="omit logprobs or send false")] = None
    max_completion_tokens: _Limit = None
    max_tokens: _Limit = None  # deprecated by OpenAI in favour of max_completion_tokens; most clients still send it
    n: _N = None
    presence_penalty: _PresencePenalty = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: _Stop = None
    stream: _Flag = False
    stream_options: _StreamOptions = None
    temperature: _Temperature = None
    tools: Annotated[list[Any] | None, _only(None, [], what=_NO_TOOLS, fix="omit tools")] = None
    top_logprobs: Annotated[int | None, _only(None, 0, fix="omit top_logprobs")] = None
    top_p: _TopP = None
    user: str | None = None
    # --- tunelab extras, not in OpenAI's API: none yet ---

    def max_new_tokens(self, default: int) -> int:
        """The generation limit: max_completion_tokens, else max_tokens, else the server's `default`."""
        return next((n for n in (self.max_completion_tokens, self.max_tokens) if n is not None), default)

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop


def _one_prompt(value: object) -> object:
    # OpenAI batches a list of prompts into one response with n choices each; we serve one prompt per request.
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise ValueError("must be a string or a list of exactly one string (token-id prompts are not supported)")
        return value[0]
    return value


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions` (legacy text completion); `prompt` is normalised to one string.

    Honoured: model, prompt, max_tokens (OpenAI's default 16), temperature, top_p, stop, seed, stream,
    stream_options.include_usage. Accepted only at their defaults: best_of, echo, frequency_penalty, logit_bias,
    logprobs, n, presence_penalty, suffix. Anything else (user, ...) is accepted and ignored.
    """

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: Annotated[str, BeforeValidator(_one_prompt)]
    best_of: Annotated[int | None, _only(None, 1, fix="omit best_of or send 1")] = None
    echo: Annotated[bool | None, _only(None, False, fix="omit echo or send false")] = None
    frequency_penalty: _FrequencyPenalty = None
    logit_bias: _LogitBias = None
    logprobs: Annotated[int | None, _only(None, fix="omit logprobs")] = None
    max_tokens: _Limit = 16
    n: _N = None
    presence_penalty: _PresencePenalty = None
    seed: int | None = None
    stop: _Stop = None
    stream: _Flag = False
    stream_options: _StreamOptions = None
    suffix: Annotated[str | None, _only(None, "", fix="omit suffix (insertion is not supported)")] = None
    temperature: _Temperature = None
    top_p: _TopP = None
    user: str | None = None
    # --- tunelab extras, not in OpenAI's API: none yet ---

    def max_new_tokens(self, default: int) -> int:
        """The generation limit: max_tokens (16 unless sent; an explicit null means the server's `default`)."""
        return default if self.max_tokens is None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop


# --------------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    """`prefix` and 24 URL-safe random characters, as in "chatcmpl-3q0VrXn7..." for new_id("chatcmpl-")."""
    return prefix + secrets.token_urlsafe(18)  # 18 bytes -> 24 base64 characters


def _now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str  # the name the client asked for (an adapter's, not the base's)
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    """What a chunk adds: `{"role": "assistant", "content": ""}` first, then `{"content": "..."}`, and `{}` on the
    chunk that carries finish_reason. Unset fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None  # null, never "", until the last content chunk


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream. Every chunk of a stream shares `id` and `created`. With
    stream_options.include_usage, a last chunk has `choices: []` and the usage; send it only when asked for, as
    clients that read `choices[0]` fail on it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason | None  # null only on stream chunks before the last


class Completion(BaseModel):
    """A `text_completion`: the whole answer, or one `data:` event of a stream (OpenAI streams the same object,
    with `usage` null except on the final `choices: []` chunk when include_usage was asked for)."""

    id: str = Field(default_factory=lambda: new_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


CompletionChunk = Completion


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # --- tunelab extras, as vLLM sends them: the base an adapter applies to, and where it was loaded from ---
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


SSE_DONE = "data: [DONE]\n\n"


def sse(obj: BaseModel | Mapping[str, Any]) -> str:
    """One server-sent event, `data: <json>\\n\\n`: a chunk, or an error body once streaming has begun. No `event:`
    or `id:` lines, which some versions of the OpenAI SDK mis-handle."""
    text = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n"


# ------------------------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """An error answered as OpenAI's envelope, `body()`, with HTTP `status` and extra `headers`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> ApiError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def model_not_found(cls, name: str) -> ApiError:
        # 404, never a fallback to another model; OpenAI's type and code, vLLM's wording.
        return cls(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    @classmethod
    def too_many_requests(cls, retry_after_s: float, message: str | None = None) -> ApiError:
        """429, which the SDK retries: it waits retry-after-ms if given, else Retry-After (whole seconds here)."""
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))),
                   "retry-after-ms": str(max(1, round(retry_after_s * 1000)))}
        message = message or f"The server is busy; retry after {retry_after_s:.3g} s."
        # type and code as OpenAI's own request-rate limit sends them
        return cls(429, message, type="requests", code="rate_limit_exceeded", headers=headers)

    @classmethod
    def server_error(cls, message: str) -> ApiError:
        return cls(500, message, type="server_error")


def validation_error(errors: ValidationError | Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 listing every problem as `path: what`, joined by "; "; `param` is the first problem's path.

    Takes a pydantic ValidationError or its `.errors()` list, such as FastAPI's RequestValidationError.errors(), whose
    locations start with "body". OpenAI answers 400 here; FastAPI's default 422 is another exception in the SDK.
    """
    found = errors.errors() if isinstance(errors, ValidationError) else errors
    problems: dict[str, None] = {}  # ordered and without repeats
    params: list[str] = []
    for error in found:
        if error.get("type") == "json_invalid":  # FastAPI: loc is ("body", character offset)
            path, what = "", f"{error['msg']}: {error.get('ctx', {}).get('error', '')}".rstrip(": ")
        else:
            path, what = _dotted(error["loc"]), str(error["msg"]).removeprefix("Value error, ")
        problems[f"{path or 'body'}: {what}"] = None
        params.append(path)
    param = params[0] if params and params[0] else None
    return ApiError.bad_request("; ".join(problems) or "The request is not valid.", param=param)


# Union members a value failed are named in the location (`content.str`, `stop.list[str]`): not field names.
_SCALARS = {"str", "int", "float", "bool", "none"}


def _dotted(loc: Sequence[str | int]) -> str:
    parts = list(loc)[1:] if list(loc)[:1] == ["body"] else list(loc)
    return ".".join(str(p) for p in parts if not (isinstance(p, str) and ("[" in p or p in _SCALARS)))
