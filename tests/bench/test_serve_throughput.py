"""bench/serve_throughput.py: its arithmetic, and a smoke run on a tiny model (tunelab's server and the swap
baseline, a few requests) that must end with a RESULT line, no failed request, and the same greedy answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import serve_throughput as st  # noqa: E402


def test_percentile_interpolates_between_ranks():
    assert st.percentile([], 50) is None
    assert st.percentile([3.0], 99) == 3.0
    assert st.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert st.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_mixes_name_the_adapters_they_promise():
    assert st.adapter_choices("base", 5, 8, 0) == [None] * 5
    assert st.adapter_choices("one", 5, 8, 0) == [0] * 5
    uniform = st.adapter_choices("uniform", 800, 8, 0)
    assert set(uniform) == set(range(8)) and max(uniform.count(a) for a in range(8)) < 150
    skewed = st.adapter_choices("skewed", 800, 8, 0)
    assert skewed.count(0) > 2 * skewed.count(1) > 0 and skewed.count(0) > 250  # Zipf 1.2: the first ~43%


def test_every_server_gets_the_same_requests_and_mixes_the_same_prompts():
    prompts = [[{"role": "user", "content": str(i)}] for i in range(50)]
    uniform = st.Scenario("uniform", "banking", 8, 24, 8)
    assert uniform.plan(prompts, 8) == uniform.plan(prompts, 8)
    base = st.Scenario("base", "banking", 8, 24, 8)
    assert [m for _, m in base.plan(prompts, 8)] == [m for _, m in uniform.plan(prompts, 8)]
    assert {a for a, _ in base.plan(prompts, 8)} == {None}


def test_summary_counts_tokens_over_wall_time_and_keeps_errors_apart():
    ok = st.Outcome(ttft=0.5, gaps=[0.1, 0.1], completion_tokens=3, prompt_tokens=10, latency=0.7)
    slow = st.Outcome(ttft=3.0, gaps=[0.1], completion_tokens=2, prompt_tokens=10, latency=3.1)
    row = st.summarize([ok, slow, st.Outcome(error="HTTP 429")], wall=2.0)
    assert row["output_tok_s"] == 2.5 and row["requests"] == 2 and row["errors"] == 1
    assert row["goodput"] == pytest.approx(1 / 3)  # only `ok` meets TTFT <= 2 s, and the failed one counts
    assert row["ttft_p50_s"] == pytest.approx(1.75)


@pytest.mark.integration
def test_a_smoke_run_serves_every_request_on_both_servers(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "serve_throughput.py"), "--tiny", "--adapters", "2", "--requests", "3",
         "--warmup", "1", "--concurrency", "2", "--mix", "base,uniform", "--prompts", "banking",
         "--servers", "tunelab,swap", "--swap-mixes", "uniform", "--precision", "fp32", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("CPU: ")
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result == json.loads(out.read_text())
    rows = result["scenarios"]
    assert set(rows["tunelab"]) == {"base/banking/c2", "uniform/banking/c2"} and set(rows["swap"]) == {
        "uniform/banking/c2"}
    for server in rows.values():
        for row in server.values():
            assert row["errors"] == 0 and row["requests"] == 3 and row["output_tokens"] > 0
    assert result["precision"].startswith("fp32 (set")
    assert rows["swap"]["uniform/banking/c2"]["same_text_as_tunelab"] == "3/3"  # greedy fp32: the engine answers as PEFT


@pytest.mark.integration
def test_engine_step_smoke_run_times_every_mix(tmp_path):
    out = tmp_path / "steps.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "engine_step.py"), "--tiny", "--rows", "4", "--rounds", "1", "--steps", "2",
         "--precision", "fp32", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("CPU: ")
    result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert result == json.loads(out.read_text())
    steps = result["ms_per_step"]["4"]
    assert set(steps) == {"base only", "1 adapter", "8 adapters", "8 + base rows"}
    assert all(ms > 0 for ms in steps.values())
