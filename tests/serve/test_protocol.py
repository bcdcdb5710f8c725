"""tunelab.serve.protocol: OpenAI's wire format. What clients routinely send parses, what we cannot honour is a 400
naming the parameter, and the openai SDK's own types parse what we send."""

from __future__ import annotations

import json

import openai.types
import openai.types.chat
import pytest
from pydantic import BaseModel, ValidationError

from tunelab.serve.protocol import (
    SSE_DONE,
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Model,
    ModelList,
    Usage,
    new_id,
    sse,
    validation_error,
)

CHAT = {"model": "banking@1", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**CHAT, **fields})


def wire(obj: BaseModel) -> dict:
    return json.loads(obj.model_dump_json())


def test_a_minimal_request_parses_and_resolves_limits_and_stops():
    req = chat()
    assert (req.messages[0].text(), req.stream, req.stop_list, req.max_new_tokens(64)) == ("hi", False, [], 64)
    assert chat(max_tokens=8).max_new_tokens(64) == 8
    assert chat(max_tokens=8, max_completion_tokens=5).max_new_tokens(64) == 5
    assert chat(stop="\n").stop_list == ["\n"] and chat(stop=["a", "b"]).stop_list == ["a", "b"]
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat(messages=[{"role": "developer", "content": parts}]).messages[0].text() == "ab"


def test_fields_clients_send_routinely_are_accepted():
    req = chat(user="u1", logprobs=False, frequency_penalty=0, presence_penalty=0.0, n=1, tools=[], store=False,
               metadata={"k": "v"}, stream=True, stream_options={"include_usage": True},
               response_format={"type": "text"})
    assert req.stream and req.stream_options.include_usage and req.response_format.type == "text"
    assert req.model_extra == {"metadata": {"k": "v"}, "store": False}
    assert chat(stream=None, temperature=None, stop=None).stream is False  # OpenAI's nullable parameters


def test_json_response_formats_are_read_as_the_sdk_sends_them():
    assert chat(response_format={"type": "json_object"}).response_format.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema,
                                                                       "strict": True}}).response_format
    assert fmt.json_schema.schema_ == schema and fmt.json_schema.strict is True


@pytest.mark.parametrize("fields, param, says", [
    ({"n": 2}, "n", "one choice per request"),
    ({"logprobs": True}, "logprobs", "omit logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "function calling"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "omit frequency_penalty"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format.json_schema.name",
     "should match pattern"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages.0.content", "'image_url'"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
])
def test_a_value_we_cannot_honour_is_rejected_naming_the_parameter(fields, param, says):
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert param in str(info.value) and says in str(info.value)
    error = validation_error(info.value)
    assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: ")
    assert says in error.message


def test_completion_requests_take_one_text_prompt():
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["Once"], "user": "u"})
    assert (req.prompt, req.max_new_tokens(64), req.stop_list) == ("Once", 16, [])  # OpenAI's default max_tokens
    assert CompletionRequest(model="m", prompt="x", max_tokens=None).max_new_tokens(64) == 64
    for bad in ({"prompt": [1, 2]}, {"prompt": ["a", "b"]}, {"prompt": "a", "echo": True}, {"prompt": "a", "n": 2}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", **bad})


def test_validation_error_lists_every_problem_and_names_the_first_parameter():
    with pytest.raises(ValidationError) as info:
        chat(messages=[], n=2, temperature=3)
    fastapi_errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]  # RequestValidationError.errors()
    error = validation_error(fastapi_errors)
    assert error.param == "messages" and error.message.count("; ") >= 2
    for problem in ("messages: List should have at least 1 item", "n: this server returns one choice",
                    "temperature: Input should be less than or equal to 2"):
        assert problem in error.message
    assert list(error.body()) == ["error"] and list(error.body()["error"]) == ["message", "type", "param", "code"]
    broken = validation_error([{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error",
                                         "ctx": {"error": "Expecting value"}}])
    assert (broken.message, broken.param) == ("body: JSON decode error: Expecting value", None)


def reply() -> ChatCompletion:
    message = AssistantMessage(content="hi")
    return ChatCompletion(model="banking@1", choices=[Choice(index=0, message=message, finish_reason="stop")],
                          usage=Usage.of(5, 2))


def test_a_chat_completion_has_openais_key_order_and_explicit_nulls():
    body = wire(reply())
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                                  "total_tokens": 7}
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]


def chunks() -> list[ChatCompletionChunk]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1", created=1, model="banking@1", choices=choices, usage=usage)
    return [chunk([ChunkChoice(index=0, delta=Delta(role="assistant", content=""))]),
            chunk([ChunkChoice(index=0, delta=Delta(content="hi"))]),
            chunk([ChunkChoice(index=0, delta=Delta(), finish_reason="stop")]),
            chunk([], Usage.of(5, 1))]  # only when stream_options.include_usage


def test_sse_frames_one_event_per_chunk_with_openais_nulls():
    events = [sse(c) for c in chunks()]
    assert all(e.startswith("data: {") and e.endswith("}\n\n") and e.count("\n") == 2 for e in events)
    first, _, last, usage = (json.loads(e.removeprefix("data: ")) for e in events)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert first["usage"] is None and usage["choices"] == [] and usage["usage"]["total_tokens"] == 6
    assert SSE_DONE == "data: [DONE]\n\n"
    error = sse(ApiError.server_error("engine stopped").body())
    assert json.loads(error.removeprefix("data: "))["error"]["type"] == "server_error" and error.endswith("}\n\n")


def test_the_openai_sdk_types_parse_our_objects():
    sdk = openai.types.chat.ChatCompletion.model_validate(wire(reply()))
    assert sdk.choices[0].message.content == "hi" and sdk.usage.total_tokens == 7
    streamed = [openai.types.chat.ChatCompletionChunk.model_validate(wire(c)) for c in chunks()]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "hi"
    assert streamed[-1].usage.completion_tokens == 1
    text = Completion(model="m", choices=[CompletionChoice(text="a", index=0, finish_reason="length")],
                      usage=Usage.of(1, 1))
    assert wire(text)["object"] == "text_completion"
    assert openai.types.Completion.model_validate(wire(text)).choices[0].text == "a"
    card = Model(id="banking@1", created=1, owned_by="tunelab", parent="smollm2-135m", root="/registry/banking/1")
    assert openai.types.Model.model_validate(wire(card)).id == "banking@1"
    assert wire(ModelList(data=[card]))["object"] == "list"


def test_api_errors_carry_openais_status_codes_and_retry_headers():
    busy = ApiError.too_many_requests(2.4)
    assert (busy.status, busy.headers) == (429, {"Retry-After": "3", "retry-after-ms": "2400"})
    assert ApiError.too_many_requests(0.2).headers == {"Retry-After": "1", "retry-after-ms": "200"}
    assert ApiError.model_not_found("nope@1").body() == {"error": {
        "message": "The model `nope@1` does not exist.", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}
    assert (ApiError.model_not_found("x").status, ApiError.server_error("boom").status) == (404, 500)
    assert ApiError.bad_request("bad", param="stop").body()["error"]["param"] == "stop"
    ids = {new_id("chatcmpl-") for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == len("chatcmpl-") + 24 for i in ids)
