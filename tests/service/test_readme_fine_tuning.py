"""README's "Fine-tuning API" walk-throughs run as written (the openai SDK block, then the curl block) against a
server on the tiny model: its address, key and base model put in."""

from __future__ import annotations

import re
import subprocess

import pytest

from fine_tuning import chat_rows
from helpers import REPO, write_jsonl

pytestmark = pytest.mark.integration  # real worker processes train real jobs: left out of `make test-fast`

SECTION = (REPO / "README.md").read_text(encoding="utf-8").split("## Fine-tuning API", 1)[1].split("\n## ", 1)[0]


def adapted(block: str, url: str, base: str) -> str:
    return block.replace("http://127.0.0.1:8000", url).replace("smollm2-135m-instruct", base)


def test_the_sdk_walk_through_runs_as_written(service, tmp_path, monkeypatch, capsys):
    url, state, keys = service
    (block,) = re.findall(r"```python\n(.*?)```", SECTION, re.S)
    monkeypatch.setenv("TUNELAB_KEY", keys["support"])
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = adapted(block, url, state.catalog.base_name).replace("time.sleep(5)", "time.sleep(0.2)")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    assert "The job has successfully completed" in out and "New fine-tuned model created: ft:" in out
    assert re.search(r"^\[\d+(, \d+)*\]$", out, re.M)  # the checkpoints' steps


def test_the_curl_walk_through_runs_as_written(service, tmp_path):
    url, state, keys = service
    (block,) = re.findall(r"```sh\n(.*?)```", SECTION, re.S)
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    script = "set -euo pipefail\n" + adapted(block, url, state.catalog.base_name)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "TUNELAB_KEY": keys["support"]})
    assert done.returncode == 0, done.stderr
    assert '"object": "fine_tuning.job"' in done.stdout or '"object":"fine_tuning.job"' in done.stdout
    assert "The job has successfully completed" in done.stdout  # the event stream, to its end
