"""What one step of the serving engine costs, per traffic mix, without HTTP: where serving time goes.

    python bench/engine_step.py [--rows 8,32] [--threads 1] [--json out.json]
    python bench/engine_step.py --tiny --rows 4 --rounds 1 --steps 2                   # smoke run

The server is built as `tunelab serve` builds it (`build_state`: precision and packing measured at start,
every linear layer wrapped for adapter slots) with the same 8 random adapters as bench/serve_throughput.py,
but its engine thread is stopped and the benchmark drives the engine's own `_admit` and `_decode` by hand:
it fills the batch with N rows of Banking77 prompts, then times decode steps (median of interleaved
rounds). Mixes: base only, 1 adapter, 8 adapters uniform, 8 adapters with a quarter of the rows on the
base. Each is reported in ms per step and as a ratio to base only measured in the same run, which is what
issue 23's throughput ratios depend on (8 adapters vs 1; mixed vs base) once prompts are out of the way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunelab.serve.multi_lora import KERNELS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

MIXES = {"base only": lambda n: [None] * n, "1 adapter": lambda n: [0] * n,
         "8 adapters": lambda n: [i % 8 for i in range(n)],
         "8 + base rows": lambda n: [None if i % 4 == 3 else i % 8 for i in range(n)]}


def build(base: str, adapters: list[Path], threads: int, precision: str, kernel: str):
    from tunelab.config import ServeConfig
    from tunelab.registry import Registry
    from tunelab.serve.server import build_state

    cfg = ServeConfig(base=base, models=[str(p) for p in adapters], threads=threads, precision=precision,
                      lora_kernel=kernel, fine_tuning=False, max_batch_rows=64, token_budget=4096, queue_size=256)
    state = build_state(cfg, Registry(Path(tempfile.mkdtemp()) / "registry"))
    state.engine.stop(0.0)  # the benchmark drives the engine's steps itself
    state.engine._stopping = False
    return state


def fill(state, prompts: list[list[int]], choices: list[int | None], max_new: int) -> None:
    """Admit one request per choice (None: the base), all in one prompt pass, then leave them decoding."""
    from tunelab.serve.engine import Request

    engine = state.engine
    for i in reversed(range(len(engine.rows))):
        engine._remove(i)
    for i, choice in enumerate(choices):
        ref = None if choice is None else state.catalog.resolve(state.cfg.models[choice]).adapter
        engine._waiting.append(Request(prompt=prompts[i % len(prompts)], adapter=ref, max_new_tokens=max_new,
                                       stop_token_ids=frozenset(), on_event=lambda event: None))
    engine._admit()
    assert len(engine.rows) == len(choices), (len(engine.rows), len(choices))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama built in a temp dir (smoke runs)")
    parser.add_argument("--rows", default="8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--kernel", default="auto", choices=["auto", *KERNELS, "fused"])
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import serve_baselines
    from serve_throughput import SYSTEM, banking_texts, prepare_adapters

    from tunelab.io import tunelab_home
    from tunelab.model.load import load_tokenizer
    from tunelab.model.precision import detect_hardware

    print(f"CPU: {detect_hardware().describe()}", flush=True)
    work = tunelab_home() / "bench" / "serve" / Path(args.base).name
    if args.tiny:
        work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
        lines = (REPO / "examples/banking77/train.csv").read_text().splitlines()[1:3000]  # its tokenizer's corpus
        args.base = str(serve_baselines.build_tiny_model(work / "tiny-llama", lines))
    adapters = prepare_adapters(args.base, 8, 0.02, work)
    state = build(args.base, adapters, args.threads, args.precision, args.kernel)
    tokenizer = load_tokenizer(args.base)
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for t in banking_texts(64)]
    rows_list = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: drift on the machine lands on every mix alike
        for rows in rows_list:
            for mix, choose in MIXES.items():
                fill(state, prompts, choose(rows), max_new=args.steps + 8)
                state.engine._decode()  # the first step after a join settles caches
                started = time.perf_counter()
                for _ in range(args.steps):
                    state.engine._decode()
                times.setdefault((rows, mix), []).append((time.perf_counter() - started) / args.steps)
    result = {"cpu": detect_hardware().describe(), "threads": args.threads, "torch": torch.__version__,
              "precision": state.engine.precision.reason, "kernel": args.kernel, "ms_per_step": {}}
    print(f"\n{detect_hardware().describe()}; {args.threads} thread(s); {state.engine.precision.reason}")
    print("| rows | traffic | ms per decode step | / base only |")
    print("|---|---|---|---|")
    for rows in rows_list:
        base = statistics.median(times[(rows, "base only")])
        for mix in MIXES:
            ms = statistics.median(times[(rows, mix)])
            result["ms_per_step"].setdefault(str(rows), {})[mix] = ms * 1000
            print(f"| {rows} | {mix} | {ms * 1000:.1f} | {ms / base:.2f} |")
    print("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
