"""Benchmark: what a run's evaluation costs, against the ways it was computed before, in one process.

    .venv/bin/python bench/eval_time.py                       # the newest demo run under runs/
    .venv/bin/python bench/eval_time.py RUN_DIR --json out.json

Two comparisons on the run's own held-out rows, the model loaded once (`tunelab eval`'s way), each side's
best of --rounds rounds, the sides alternating:

1. the reference answers' loss, per contender: generation and then a forward pass of its own over every
   prompt and answer (`contenders.reference_loss`, how evaluation scored until session 20) against
   generation reading the loss off its own prompt pass (`generate(..., references=...)`). Both losses
   are printed: they must agree up to the precision's rounding.
2. the whole evaluation (`contenders.evaluate_run`, forgetting check included): a machine that has never
   evaluated this base (a fresh `base-results` folder) against a second run on the same machine, which
   reads the base's half back (evaluation/base_results.py).

Run it alone: two CPU-heavy processes on a 2-core machine slow each other far more than 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __name__ == "__main__":  # as tunelab's CLI does: on tcmalloc where the system has it
    from tunelab.cli.allocator import relaunch_with_tcmalloc

    relaunch_with_tcmalloc()

import torch  # noqa: E402

from tunelab.data.tokenize import render_prompt  # noqa: E402
from tunelab.evaluation import contenders as C  # noqa: E402
from tunelab.evaluation.base_results import BaseResults  # noqa: E402
from tunelab.evaluation.generate import generate  # noqa: E402
from tunelab.evaluation.metrics import task_for_metric_setting  # noqa: E402
from tunelab.model.load import resolve_model, weights_fingerprint  # noqa: E402
from tunelab.model.precision import choose_precision, detect_hardware  # noqa: E402
from tunelab.rundir import finished, load_run  # noqa: E402
from tunelab.training.objectives import objective_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def newest_demo_run() -> Path:
    runs = sorted((REPO / "runs").glob("banking77-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        sys.exit("no finished demo run under runs/: run `make demo` first, or pass RUN_DIR")
    return runs[-1].parent


def timed(fn):  # noqa: ANN001, ANN201
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="as train.precision (auto: what this CPU runs faster, measured)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run_dir = args.run_dir or newest_demo_run()

    precision = choose_precision(args.precision)
    model, tokenizer, cfg = load_run(finished(run_dir).path, dtype=precision.weights_dtype)
    test_rows, train_rows = objective_for(cfg).held_out(cfg.data)
    rows = test_rows[: cfg.eval.max_rows] if cfg.eval.max_rows else list(test_rows)
    task, _, _ = task_for_metric_setting(cfg.eval.metric, [r.answer for r in train_rows + list(test_rows)])
    labels = sorted({r.answer for r in train_rows + list(test_rows)}) if task == "classification" else None
    prompts, _ = C.contender_prompts(rows, train_rows, labels, cfg.eval.few_shot, cfg.eval.seed)
    max_new = C._max_new_tokens(tokenizer, [r.answer for r in rows], labels, cfg.eval)
    stop = ["\n"] if task == "classification" else None
    print(f"CPU: {detect_hardware().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"precision: {precision.reason}")
    print(f"run: {run_dir}, {len(rows)} held-out rows, answers up to {max_new} new tokens\n")

    losses: dict[str, dict] = {}
    for name, messages in prompts.items():
        ids = [render_prompt(tokenizer, m) for m in messages]
        answers = C.reference_answers(tokenizer, rows, messages, ids)

        def separate(messages=messages, ids=ids) -> float:  # noqa: ANN001
            generate(model, tokenizer, ids, max_new_tokens=max_new, batch_size=None, precision=precision,
                     stop_strings=stop)
            return C.reference_loss(model, tokenizer, rows, messages, precision, cfg.eval.loss_batch)["loss"]

        def shared(ids=ids, answers=answers) -> float:  # noqa: ANN001
            run = generate(model, tokenizer, ids, max_new_tokens=max_new, batch_size=None, precision=precision,
                           stop_strings=stop, references=answers)
            return C.shared_pass_loss(run, answers)["loss"]

        best = {"separate": float("inf"), "shared": float("inf")}
        value = {}
        with C._weights_of(name, model, None):
            for _ in range(args.rounds):
                for side, fn in (("separate", separate), ("shared", shared)):
                    seconds, value[side] = timed(fn)
                    best[side] = min(best[side], seconds)
        losses[name] = {"separate_s": best["separate"], "shared_s": best["shared"],
                        "ratio": best["separate"] / best["shared"], "loss_separate": value["separate"],
                        "loss_shared": value["shared"]}
        print(f"{name:<15} generation + loss pass {best['separate']:6.1f} s | loss read off generation "
              f"{best['shared']:6.1f} s | {best['separate'] / best['shared']:.2f}x | loss {value['separate']:.5f} "
              f"vs {value['shared']:.5f}", flush=True)

    base = f"{weights_fingerprint(resolve_model(cfg.model.name))} kernels={cfg.model.kernels} bench"
    whole = {}
    with tempfile.TemporaryDirectory() as folder:
        reuse = BaseResults(base, precision, Path(folder))
        for side in ("first run on this machine", "a later run (the base read back)"):
            seconds, result = timed(lambda: C.evaluate_run(model, tokenizer, test_rows, train_rows, cfg.eval,
                                                           precision, reuse=reuse))
            whole[side] = seconds
            reused = [n for n, c in result.contenders.items() if c.reused]
            print(f"whole evaluation, {side}: {seconds:6.1f} s (read back: {', '.join(reused) or 'nothing'}"
                  f"{', the forgetting base' if result.forgetting and result.forgetting.base_reused else ''})",
                  flush=True)
    first, later = whole.values()
    print(f"a later run's evaluation: {first / later:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps({"cpu": detect_hardware().describe(), "precision": precision.reason,
                                         "rows": len(rows), "loss": losses, "whole_evaluation_s": whole}, indent=2))


if __name__ == "__main__":
    main()
