"""The HTTP API through the official `openai` SDK (sync and async, streamed and not) on 127.0.0.1:
answers equal the engine's reference, names resolve per request, and every refusal has OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Literal

import httpx2 as httpx  # the HTTP client the openai SDK is built on
import openai
import pytest
from pydantic import BaseModel

from serving import listening, serve_config, wait_until

MESSAGES = [{"role": "user", "content": "where is my card"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_runs, tmp_path_factory):
    """A server for every registry model: bank@1 (the r4 adapter), bank@2 (r8), bank@production -> 1."""
    from tunelab.registry import Registry
    from tunelab.serve.app import create_app
    from tunelab.serve.server import build_state

    registry = Registry(tmp_path_factory.mktemp("registry"))
    registry.register(adapter_runs["r4"], "bank")
    registry.register(adapter_runs["r8"], "bank")
    registry.promote("bank@1", force=True, reason="test")
    state = build_state(serve_config(tiny_model_dir, [], max_batch_rows=4, queue_size=4), registry=registry)
    with listening(create_app(state)) as url:
        yield url, state, registry
    state.engine.stop(grace_seconds=5)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(client, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, **kwargs)


def test_models_lists_the_base_versions_and_aliases(server):
    url, state, _ = server
    ids = {m.id: m for m in _client(url).models.list()}
    base = state.catalog.base_name
    assert {base, "bank@1", "bank@2", "bank@production"} <= set(ids)
    assert ids["bank@2"].parent == base and ids[base].parent is None and ids["bank@2"].object == "model"
    assert _client(url).models.retrieve("bank@production").id == "bank@production"


def test_an_adapter_answers_as_its_version_and_echoes_the_name(server):
    url, state, _ = server
    client = _client(url)
    by_alias = _greedy(client, "bank@production")
    by_version = _greedy(client, "bank@1")
    other = _greedy(client, "bank@2")
    base = _greedy(client, state.catalog.base_name)
    assert by_alias.model == "bank@production" and by_alias.object == "chat.completion"
    assert by_alias.choices[0].message.content == by_version.choices[0].message.content
    assert len({by_version.choices[0].message.content, other.choices[0].message.content,
                base.choices[0].message.content}) == 3
    usage = by_alias.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0
    assert isinstance(by_alias.created, int)


def test_a_stream_says_the_same_as_the_whole_answer(server):
    url, _, _ = server
    client = _client(url)
    whole = _greedy(client, "bank@2")
    chunks = list(_greedy(client, "bank@2", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_async_clients_in_parallel_get_their_own_models_answers(server):
    url, state, _ = server
    client = _client(url)
    names = ["bank@1", "bank@2", state.catalog.base_name]
    expected = {n: _greedy(client, n).choices[0].message.content for n in names}

    async def many():
        # 9 requests for 4 rows and 4 places in line: the SDK retries a 429 after its Retry-After
        async_client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5, timeout=60)
        calls = [async_client.chat.completions.create(model=n, messages=MESSAGES, max_tokens=12, temperature=0)
                 for n in names * 3]
        return await asyncio.gather(*calls)

    for name, answer in zip(names * 3, asyncio.run(many())):
        assert answer.choices[0].message.content == expected[name], name


def test_promote_and_rollback_take_effect_on_the_next_request(server):
    url, _, registry = server
    client = _client(url)
    v1, v2 = (_greedy(client, f"bank@{v}").choices[0].message.content for v in (1, 2))
    registry.promote("bank@2", force=True, reason="test")
    assert _greedy(client, "bank@production").choices[0].message.content == v2
    registry.rollback("bank")
    assert _greedy(client, "bank@production").choices[0].message.content == v1


def test_promote_under_load_switches_every_later_request_and_fails_none(server):
    """Requests keep arriving for bank@production while it moves from version 1 to 2: every request that
    arrives after the promote answers as version 2, earlier ones as 1 or 2, and none fails."""
    import time

    url, _, registry = server
    client = _client(url)
    v1, v2 = (_greedy(client, f"bank@{v}").choices[0].message.content for v in (1, 2))
    done: list[tuple[float, str | None]] = []  # (when the request was sent, its answer; None: it failed)
    stop = threading.Event()

    def keep_asking() -> None:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5, timeout=60)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                done.append((sent, _greedy(own, "bank@production").choices[0].message.content))
            except openai.OpenAIError:
                done.append((sent, None))

    workers = [threading.Thread(target=keep_asking) for _ in range(3)]
    for w in workers:
        w.start()
    wait_until(lambda: len(done) >= 3)
    registry.promote("bank@2", force=True, reason="test")
    promoted = time.monotonic()
    wait_until(lambda: sum(sent > promoted for sent, _ in done) >= 3)
    stop.set()
    for w in workers:
        w.join()
    registry.rollback("bank")  # as the other tests expect it
    assert all(answer in (v1, v2) for _, answer in done), "a request failed or got another model's answer"
    assert all(answer == v2 for sent, answer in done if sent > promoted)
    assert any(answer == v1 for sent, answer in done if sent < promoted)


def test_completions_endpoint(server):
    url, state, _ = server
    done = _client(url).completions.create(model="bank@1", prompt="good morning", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 5
    assert done.choices[0].finish_reason in ("stop", "length")


class Intent(BaseModel):
    intent: Literal["card_lost", "refund"]
    urgent: bool


def test_a_json_schema_answer_follows_the_schema_through_the_sdks_parse(server):
    """The tiny random model knows nothing of JSON: only the constraint can make its answers parse."""
    url, state, _ = server
    for model in ("bank@1", state.catalog.base_name):
        completion = _client(url).chat.completions.parse(model=model, messages=MESSAGES, response_format=Intent,
                                                         max_tokens=200, temperature=0)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Intent), choice.message.content
    unconstrained = _greedy(_client(url), "bank@1").choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(unconstrained)  # else the test above would prove nothing


def test_a_json_object_stream_parses_once_joined(server):
    url, _, _ = server
    messages = [{"role": "user", "content": "answer in JSON: where is my card"}]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    stream = _client(url).chat.completions.create(
        model="bank@2", messages=messages, max_tokens=200, temperature=0.8, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "N", "schema": schema}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert set(json.loads(text)) == {"n"} and json.loads(text)["n"] <= 99
    answer = _client(url).chat.completions.create(model="bank@2", messages=messages, max_tokens=8, temperature=0,
                                                  response_format={"type": "json_object"})
    content = answer.choices[0].message.content
    assert content.startswith("{") and answer.choices[0].finish_reason in ("stop", "length")
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize(("fmt", "messages", "param", "says"), [
    ({"type": "json_object"}, MESSAGES, "messages", "must contain the word 'json'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     MESSAGES, "response_format", "schema"),
])
def test_a_json_format_that_cannot_be_enforced_is_a_400(server, fmt, messages, param, says):
    url, _, _ = server
    body = {"model": "bank@1", "messages": messages, "response_format": fmt}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_an_unknown_model_is_a_404_never_the_base(server):
    url, _, _ = server
    with pytest.raises(openai.NotFoundError) as caught:
        _greedy(_client(url), "bank@7")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MESSAGES}, "model"),
    ({"model": "bank@1", "messages": MESSAGES, "n": 2}, "n"),
    ({"model": "bank@1", "messages": MESSAGES, "max_tokens": 100000}, "max_tokens"),
    ({"model": "bank@1", "messages": [], "temperature": 5}, "messages"),
])
def test_a_bad_body_is_a_400_naming_the_parameter(server, body, param):
    url, _, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_not_json_and_unknown_paths_answer_in_openai_shape(server):
    url, _, _ = server
    bad = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"


def test_a_full_queue_is_a_429_with_retry_after(server):
    url, state, _ = server
    long = {"model": "bank@1", "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stop": ["never"]}
    results = []

    def post():
        results.append(httpx.post(f"{url}/v1/chat/completions", json=long, timeout=120))

    threads = [threading.Thread(target=post) for _ in range(16)]  # 4 rows + 4 waiting; the rest is refused
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r.status_code == 429]
    assert refused and all(r.status_code == 200 for r in results if r not in refused)
    assert int(refused[0].headers["retry-after"]) >= 1 and int(refused[0].headers["retry-after-ms"]) > 0
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"


def test_a_client_that_leaves_a_stream_frees_its_row(server):
    url, state, _ = server
    body = {"model": "bank@2", "messages": MESSAGES, "max_tokens": 200, "stream": True, "stop": ["never"]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        wait_until(lambda: state.engine.running() == 1)
    wait_until(lambda: state.engine.running() == 0, timeout=10)
    assert all(r == 0 for r in state.engine.slots.refs)


def test_health_and_metrics(server):
    url, _, _ = server
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("tunelab_requests_total", "tunelab_generation_tokens_total", "tunelab_queue_depth",
                 "tunelab_batch_rows_bucket", "tunelab_time_to_first_token_seconds_bucket",
                 "tunelab_adapter_slots_loaded"):
        assert name in text, name


def test_the_readme_serve_example_runs_as_written(server, capsys):
    """README's "Serve your fine-tunes" Python block, with this server's address and names put in."""
    import re

    from helpers import REPO

    url, state, _ = server
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Serve your fine-tunes", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    block = (block.replace("http://127.0.0.1:8000", url).replace("banking@production", "bank@production")
             .replace('"smollm2-135m-instruct"', repr(state.catalog.base_name)))
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.strip()


def test_with_api_keys_a_request_without_a_right_key_is_a_401_saying_how_to_send_one(server):
    import dataclasses

    from fastapi.testclient import TestClient

    from tunelab.serve.app import create_app

    _, state, _ = server
    keyed = dataclasses.replace(state, cfg=state.cfg.model_copy(update={"api_keys": ["k-123"]}), mailbox=None)
    client = TestClient(create_app(keyed))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = client.get("/v1/models", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in refused.json()["error"]["message"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer k-123"}).status_code == 200
