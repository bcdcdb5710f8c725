"""`tunelab serve` as a user starts it: a subprocess on 127.0.0.1 that answers the SDK, refuses what it cannot
serve before binding, and on SIGTERM finishes the answer in flight and exits cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx2
import pytest

from helpers import REPO, assert_user_error, cli


def _start(*args: str, cwd) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", "0", *args], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the run log, then uvicorn's address line
        lines.append(line)
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(1)
    raise AssertionError("the server did not start:\n" + "".join(lines))


def test_serve_answers_and_stops_gracefully_on_sigterm(tmp_path, tiny_model_dir, adapter_runs):
    run = adapter_runs["r4"]
    proc, url = _start("--base", str(tiny_model_dir), "--model", str(run), "--set", "precision=fp32", cwd=tmp_path)
    try:
        ids = [m["id"] for m in httpx2.get(f"{url}/v1/models", timeout=30).json()["data"]]
        assert ids == [str(tiny_model_dir), str(run)]
        body = {"model": str(run), "messages": [{"role": "user", "content": "good morning"}], "max_tokens": 150,
                "temperature": 0, "stream": True, "stop": ["never"]}
        with httpx2.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-answer: the answer still ends properly
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        # uvicorn, once every response has ended, re-raises the signal it caught, so the process ends by it
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("args", "fragments"), [
    (["--model", "no-such-model@2"], ["--model no-such-model@2", "neither a run directory nor a model"]),
    (["--set", "max_batch_rows=0"], ["max_batch_rows", "greater than or equal to 1"]),
])
def test_serve_refuses_bad_options_before_binding(tmp_path, tiny_model_dir, args, fragments):
    proc = cli("serve", "--base", str(tiny_model_dir), *args, cwd=tmp_path, timeout=120)
    assert_user_error(proc, *fragments)
