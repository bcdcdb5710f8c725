"""The fine-tuning API through the official `openai` SDK, on the tiny model, against a real server on 127.0.0.1:
upload, validate, train in a worker process, events, checkpoints, serve the result, delete it; refusals with
OpenAI's shape; two projects that cannot see each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from fine_tuning import TINY, chat_rows, client, upload, wait_for
from helpers import write_jsonl

pytestmark = pytest.mark.integration  # real worker processes train real jobs: left out of `make test-fast`


def test_the_sdk_script_trains_serves_and_deletes_a_fine_tune(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows()))
    assert f.object == "file" and f.purpose == "fine-tune" and f.filename == "train.jsonl"
    assert c.files.wait_for_processing(f.id, poll_interval=0.1).status == "processed"
    base = state.catalog.base_name
    job = c.fine_tuning.jobs.create(
        model=base, training_file=f.id, suffix="support", seed=7, metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}}},
        extra_body={"tunelab": {k: v for k, v in TINY.items() if k != "model"}})  # tunelab's kernels, as by default
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.learning_rate_multiplier == "auto"
    assert job.fine_tuned_model is None and job.result_files == [] and job.seed == 7
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{Path(base).name}:support:support:{job.id.removeprefix('ftjob-')}"
    assert job.hyperparameters.learning_rate_multiplier == 1.0 and job.trained_tokens > 0
    assert isinstance(job.finished_at, int) and job.error is None

    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert f"New fine-tuned model created: {job.fine_tuned_model}" in messages
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "total_steps"} <= set(metrics[0].data)
    assert sorted(e.data["step"] for e in metrics) == list(range(1, len(metrics) + 1))  # each step once
    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].step_number == metrics[0].data["total_steps"]
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(job.fine_tuned_model + ":ckpt-step-")

    csv_file = next(c.files.retrieve(i) for i in job.result_files if c.files.retrieve(i).filename.endswith(".csv"))
    assert csv_file.purpose == "fine-tune-results"
    lines = c.files.content(csv_file.id).text.splitlines()
    assert lines[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(lines) == 1 + len(metrics)
    evaluation = next(json.loads(c.files.content(i).text) for i in job.result_files
                      if c.files.retrieve(i).filename == "eval.json")
    assert "finetune" in evaluation["contenders"] and "base_zero_shot" in evaluation["contenders"]

    answer = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "where is my card"}])
    assert answer.model == job.fine_tuned_model and answer.choices[0].message.content
    assert job.fine_tuned_model in {m.id for m in c.models.list()}
    # The last checkpoint, served as a model of its own, is the final adapter: same answers.
    last = checkpoints[0].fine_tuned_model_checkpoint
    by_checkpoint = c.chat.completions.create(model=last, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "where is my card"}])
    assert by_checkpoint.model == last
    assert by_checkpoint.choices[0].message.content == answer.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=job.fine_tuned_model + ":ckpt-step-999999",
                                  messages=[{"role": "user", "content": "hi"}])
    other = client(url, keys["other"])
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=last, messages=[{"role": "user", "content": "hi"}])
    assert job.fine_tuned_model not in {m.id for m in other.models.list()}
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        other.models.delete(job.fine_tuned_model)
    assert c.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "a"})] == [job.id]
    assert list(c.fine_tuning.jobs.list(metadata={"team": "b"})) == []


def test_a_malformed_file_fails_the_job_with_its_line_and_nothing_runs(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    rows = [json.dumps(r) for r in chat_rows()]
    rows[2] = '{"messages": [{"role": "bot", "content": "x"}]}'
    rows[5] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    f = upload(c, path)
    assert f.status == "error" and "bad.jsonl:3" in f.status_details and "more error" in f.status_details
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id)
    assert job.status == "failed"
    assert job.error.param == "training_file" and "bad.jsonl:3" in job.error.message
    (report_id,) = job.result_files
    report = json.loads(c.files.content(report_id).text)
    assert {x["line"] for x in report["findings"] if x["severity"] == "error"} == {3, 6}
    time.sleep(1.0)  # a supervisor tick or two: it must not start anything for this job
    assert not state.service.storage.job_dir(job.id).exists()
    assert c.fine_tuning.jobs.retrieve(job.id).status == "failed"


def test_bad_requests_are_400s_naming_the_parameter(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path / "ok.jsonl", chat_rows()))
    base = state.catalog.base_name
    cases = [
        ({"model": "gpt-4o-mini", "training_file": f.id}, "model"),
        ({"model": base, "training_file": "file-nope"}, "training_file"),
        ({"model": base, "training_file": f.id, "method": {"type": "reinforcement"}}, "method.type"),
        ({"model": base, "training_file": f.id, "extra_body": {"tunelab": {"lora": {"rnak": 4}}}}, "tunelab"),
        ({"model": base, "training_file": f.id, "extra_body": {"tunelab": {"model": "x"}}}, "tunelab"),
        ({"model": base, "training_file": f.id, "extra_body": {"tunelab": {"model": {"name": "x"}}}}, "tunelab"),
        ({"model": base, "training_file": f.id, "suffix": "a/b"}, "suffix"),
        ({"model": base, "training_file": f.id, "extra_body": {"tunelab": {"lora": {"rank": 64}}}}, "tunelab"),
        ({"model": base, "training_file": f.id, "extra_body": {"tunelab": {"lora": {"use_dora": True}}}}, "tunelab"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            c.fine_tuning.jobs.create(**kwargs)
        assert caught.value.status_code == 400 and caught.value.body["param"] == param, (kwargs, caught.value.body)
    with pytest.raises(openai.BadRequestError, match="rnak"):
        c.fine_tuning.jobs.create(model=base, training_file=f.id, extra_body={"tunelab": {"lora": {"rnak": 4}}})
    with pytest.raises(openai.BadRequestError, match="jsonl"):
        c.files.create(file=("notes.txt", b"hello"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("a.jsonl", b"{}"), purpose="nonsense")
    response = httpx.post(f"{url}/v1/fine_tuning/jobs", content=b"{not json",
                          headers={"Authorization": f"Bearer {keys['support']}"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_upload_over_the_limit_is_a_413(service):
    url, state, keys = service
    limit = state.service.max_upload_bytes
    state.service.max_upload_bytes = 2048
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client(url, keys["support"]).files.create(file=("big.jsonl", b"x" * 10_000), purpose="fine-tune")
        assert caught.value.status_code == 413
    finally:
        state.service.max_upload_bytes = limit
    left = [p.name for p in (state.service.storage.root / "files").iterdir() if p.name.startswith(".upload")]
    assert left == []  # nothing half-written stays behind


def test_two_projects_cannot_see_or_touch_each_others_objects(service, tmp_path):
    url, state, keys = service
    a, b = client(url, keys["support"]), client(url, keys["other"])
    f = upload(a, write_jsonl(tmp_path / "mine.jsonl", chat_rows()))
    job = a.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id,
                                    extra_body={"tunelab": TINY})
    not_found = [
        lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id), lambda: b.files.delete(f.id),
        lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
        lambda: b.fine_tuning.jobs.pause(job.id), lambda: b.fine_tuning.jobs.resume(job.id),
        lambda: list(b.fine_tuning.jobs.list_events(job.id)), lambda: list(b.fine_tuning.jobs.checkpoints.list(job.id)),
    ]
    for call in not_found:
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        b.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id)
    assert f.id not in {x.id for x in b.files.list()} and job.id not in {x.id for x in b.fine_tuning.jobs.list()}
    with pytest.raises(openai.AuthenticationError):
        client(url, "tl-not-a-key").files.list()
    response = httpx.get(f"{url}/v1/files")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # the one route without a key
    assert httpx.get(f"{url}/metrics").status_code == 401  # its labels name every project's models
    assert a.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "running")
    assert wait_for(a, job.id).status == "cancelled"


def test_a_revoked_key_is_refused(service):
    url, state, _ = service
    from tunelab.service.keys import create_key, revoke_key

    secret, record = create_key(state.service.store, "support")
    assert client(url, secret).files.list().object == "list"
    revoke_key(state.service.store, record.id)
    with pytest.raises(openai.AuthenticationError):
        client(url, secret).files.list()


def test_lists_page_as_the_sdk_pages_them(service, tmp_path):
    url, _, _ = service
    from tunelab.service.keys import create_key

    secret, _ = create_key(service[1].service.store, "pages")
    c = client(url, secret)
    ids = [upload(c, write_jsonl(tmp_path / f"p{i}.jsonl", chat_rows())).id for i in range(3)]
    first = c.files.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    assert sorted(x.id for x in c.files.list(limit=1)) == sorted(ids)
    ascending = list(c.files.list(limit=2, order="asc"))
    assert sorted(x.id for x in ascending) == sorted(ids)
    assert [x.created_at for x in ascending] == sorted(x.created_at for x in ascending)
    assert c.files.delete(ids[0]).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(ids[0])


def test_a_dry_run_returns_the_plan_and_creates_no_job(service, tmp_path):
    url, state, keys = service
    from tunelab.service.keys import create_key

    c = client(url, create_key(state.service.store, "planning")[0])
    f = upload(c, write_jsonl(tmp_path / "plan.jsonl", chat_rows()))
    plan = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id,
                                     extra_body={"dry_run": True, "tunelab": TINY}).to_dict()
    assert plan["object"] == "fine_tuning.job.plan" and plan["training_file"] == f.id
    assert plan["steps"] > 0 and plan["tokens"]["trained"] > 0 and plan["estimate_seconds"]["total"] > 0
    assert list(c.fine_tuning.jobs.list()) == []


def test_the_event_stream_replays_after_last_event_id(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path / "sse.jsonl", chat_rows()))
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id, extra_body={"tunelab": TINY})
    headers = {"Authorization": f"Bearer {keys['support']}"}

    def stream(extra: dict) -> list[tuple[int, dict]]:
        events, seq = [], None
        with httpx.stream("GET", f"{url}/v1/fine_tuning/jobs/{job.id}/events?stream=true",
                          headers={**headers, **extra}, timeout=120) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("id: "):
                    seq = int(line[4:])
                elif line.startswith("data: "):
                    events.append((seq, json.loads(line[6:])))
        return events

    events = stream({})  # ends when the job has finished
    assert [s for s, _ in events] == sorted(s for s, _ in events)
    assert events[-1][1]["message"] == "The job has successfully completed"
    assert all(e["object"] == "fine_tuning.job.event" and e["id"] == f"ftevent-{s}" for s, e in events)
    middle = events[len(events) // 2][0]
    assert stream({"Last-Event-ID": str(middle)}) == [(s, e) for s, e in events if s > middle]


def test_key_limits_answer_429_with_retry_after(service, tmp_path):
    url, state, keys = service
    from tunelab.service.keys import create_key

    limited, _ = create_key(state.service.store, "support", requests_per_minute=3)
    c = client(url, limited)
    for _ in range(3):
        c.files.list()
    with pytest.raises(openai.RateLimitError) as caught:
        c.files.list()
    assert int(caught.value.response.headers["retry-after"]) >= 1
    one_job, _ = create_key(state.service.store, "support", max_active_jobs=1)
    c = client(url, one_job)
    f = upload(c, write_jsonl(tmp_path / "limit.jsonl", chat_rows()))
    first = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id, extra_body={"tunelab": TINY})
    with pytest.raises(openai.RateLimitError, match="unfinished job"):
        c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id, extra_body={"tunelab": TINY})
    with pytest.raises(openai.ConflictError, match=first.id):
        c.files.delete(f.id)  # a file an unfinished job uses
    c.fine_tuning.jobs.cancel(first.id)
    assert wait_for(c, first.id).status == "cancelled"
    assert c.files.delete(f.id).deleted


def test_a_published_fine_tune_cannot_be_deleted_while_an_alias_points_at_it(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path / "pub.jsonl", chat_rows()))
    job = wait_for(c, c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id,
                                                extra_body={"tunelab": TINY}).id)
    registry = state.service.registry
    run_dir = next(p for p in state.service.storage.job_dir(job.id).iterdir() if p.is_dir() and not p.name[0] == ".")
    registry.register(run_dir, "published")
    registry.promote("published@1", force=True, reason="test")
    with pytest.raises(openai.ConflictError, match="published@production"):
        c.models.delete(job.fine_tuned_model)
    registry.delete("published@1", force=True, reason="test")
    assert c.models.delete(job.fine_tuned_model).deleted


def test_nothing_a_client_sends_gives_a_500(service):
    """Odd ids (path traversal included), bodies of the wrong type and shape, bad query values: each route answers
    4xx in OpenAI's shape."""
    url, _, keys = service
    auth = {"Authorization": f"Bearer {keys['support']}"}
    odd_ids = ["..%2F..%2Fetc%2Fpasswd", "file-" + "a" * 24, "%00", "ftjob-" + "../" * 8, "x" * 2000]
    calls = []
    for odd in odd_ids:
        calls += [("GET", f"/v1/files/{odd}", None), ("GET", f"/v1/files/{odd}/content", None),
                  ("DELETE", f"/v1/files/{odd}", None), ("GET", f"/v1/fine_tuning/jobs/{odd}", None),
                  ("POST", f"/v1/fine_tuning/jobs/{odd}/cancel", None),
                  ("GET", f"/v1/fine_tuning/jobs/{odd}/events?after={odd}", None),
                  ("GET", f"/v1/fine_tuning/jobs/{odd}/checkpoints", None), ("DELETE", f"/v1/models/{odd}", None)]
    bodies = [b"", b"null", b"[]", b'"x"', b"{}", b'{"model": 3, "training_file": []}',
              b'{"model": "m", "training_file": "f", "method": {"type": "dpo", "dpo": {"hyperparameters": []}}}',
              b'{"model": "m", "training_file": "f", "tunelab": "not a mapping"}', b"\xff\xfe"]
    calls += [("POST", "/v1/fine_tuning/jobs", body) for body in bodies]
    calls += [("GET", "/v1/files?limit=0", None), ("GET", "/v1/files?limit=abc", None),
              ("GET", "/v1/files?order=sideways", None), ("GET", "/v1/files?after=file-nope", None),
              ("GET", "/v1/fine_tuning/jobs?limit=-1", None), ("GET", "/v1/fine_tuning/jobs?after=nope", None),
              ("POST", "/v1/files", b"not multipart")]
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        for method, path, body in calls:
            response = http.request(method, path, content=body,
                                    headers={"Content-Type": "application/json"} if body is not None else {})
            assert 400 <= response.status_code < 500, (method, path, body, response.status_code, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, (method, path)
        upload = http.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"},
                           headers={"Content-Type": "multipart/form-data"})  # no boundary
        assert 400 <= upload.status_code < 500


def test_a_dpo_job_trains_preference_pairs(service, tmp_path):
    from helpers import dpo_rows, many_pairs

    url, state, keys = service
    c = client(url, keys["support"])
    f = upload(c, write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(many_pairs(40))))
    assert f.status == "processed", f.status_details
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id,
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}},
                                    extra_body={"tunelab": TINY})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.n_epochs == 2 and isinstance(job.method.dpo.hyperparameters.batch_size, int)
    assert c.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                     messages=[{"role": "user", "content": "good morning"}]).choices


def test_lint_findings_become_warn_events(service, tmp_path):
    url, state, keys = service
    c = client(url, keys["support"])
    rows = chat_rows()
    rows.append({"messages": [{"role": "user", "content": rows[0]["messages"][0]["content"]},
                              {"role": "assistant", "content": "refund"}]})  # the same question, another answer
    f = upload(c, write_jsonl(tmp_path / "lint.jsonl", rows + rows[:3]))  # and three duplicates
    job = c.fine_tuning.jobs.create(model=state.catalog.base_name, training_file=f.id, extra_body={"tunelab": TINY})
    warnings = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.level == "warn"]
    kinds = {e.data["kind"] for e in warnings}
    assert {"exact_duplicate", "conflicting_answers"} <= kinds, kinds
    assert all("lint.jsonl:" in e.message for e in warnings)
    c.fine_tuning.jobs.cancel(job.id)
    assert wait_for(c, job.id).status == "cancelled"
