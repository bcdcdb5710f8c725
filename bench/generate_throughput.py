"""Benchmark: tunelab's batched generation vs Hugging Face `generate`, same prompts, same run.

    .venv/bin/python bench/generate_throughput.py                 # 300 Banking77 prompts
    .venv/bin/python bench/generate_throughput.py --rows 64 --json out.json

Work: SmolLM2-135M-Instruct (the bundled default), the first N Banking77 test rows of
tunelab's split, each as the demo's prompt (system prompt + message + assistant
header), greedy, exactly --new-tokens tokens per row (no early stop on either side,
so both do the same work). Tokens/s counts generated tokens only.

Baseline: `model.generate` with batch 16 and left padding, the model loaded by
transformers with its default attention (SDPA), bf16 weights on an AMX CPU like ours.
tunelab: `tunelab.evaluation.generate.generate` with its defaults (length-grouped batches
sized by tokens: up to 128 short prompts, fewer long ones; shared-prefix KV cache,
grouped-query attention), or `--batch N` rows per batch. Rounds alternate between the
two sides, and each side's best round is reported; the ratio compares those.
Both sides run in one process, on tcmalloc where the system has it (as tunelab's CLI does;
TUNELAB_ALLOCATOR=system keeps glibc's malloc). Also reported: how many rows produced the same tokens on both sides (bf16 greedy
decoding can flip a near-tie, so a few differences are expected, not a bug).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __name__ == "__main__":  # as tunelab's CLI does: on tcmalloc where the system has it (both sides share it)
    from tunelab.cli.allocator import relaunch_with_tcmalloc

    relaunch_with_tcmalloc()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tunelab.cli import allocator  # noqa: E402
from tunelab.config import DataConfig  # noqa: E402
from tunelab.data.read import read_conversations  # noqa: E402
from tunelab.data.split import split_conversations  # noqa: E402
from tunelab.data.tokenize import render_prompt  # noqa: E402
from tunelab.evaluation.contenders import few_shot_messages  # noqa: E402
from tunelab.evaluation.generate import generate  # noqa: E402
from tunelab.model.load import load_model, resolve_model  # noqa: E402
from tunelab.model.precision import choose_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, batch_size: int) -> list[list[int]]:
    """The baseline: transformers' generate, batch 16, left padding, greedy."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
        out.extend(gen[:, width:].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="prompts (Banking77 test rows)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side; best is kept")
    parser.add_argument("--prompt", default="finetune", choices=["finetune", "labels"],
                        help="finetune: the demo's short prompt (~33 tokens); labels: the base model's prompt "
                             "listing all 77 labels (~591 tokens, 571 shared by every row)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="fp32 checks that both sides generate the same tokens")
    parser.add_argument("--batch", type=int, default=None,
                        help="tunelab's rows per batch (default: sized by tokens, as evaluation does)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    precision = choose_precision(args.precision)
    resolved = resolve_model("smollm2-135m-instruct")
    ours, tokenizer = load_model(resolved, dtype=precision.weights_dtype)
    ours.eval()
    baseline = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=precision.weights_dtype).eval()

    data = DataConfig(path=REPO / "examples/banking77/train.csv", format="csv", input_column="text",
                      output_column="category", system_prompt="Classify the intent.")
    rows = split_conversations(read_conversations(data)).test[: args.rows]
    if args.prompt == "labels":
        labels = sorted({r.answer for r in split_conversations(read_conversations(data)).train})
        prompts = [render_prompt(tokenizer, few_shot_messages(r, [], labels)) for r in rows]  # zero shots + label list
    else:
        prompts = [render_prompt(tokenizer, r.prompt_messages) for r in rows]

    best = {"tunelab": float("inf"), "hf": float("inf")}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        started = time.perf_counter()
        with precision.autocast():
            outputs["hf"] = hf_generate(baseline, tokenizer, prompts, args.new_tokens, batch_size=16)
        best["hf"] = min(best["hf"], time.perf_counter() - started)

        run = generate(ours, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch,
                       precision=precision, stop_token_ids=[])
        best["tunelab"] = min(best["tunelab"], run.seconds)
        outputs["tunelab"] = [g.token_ids for g in run.generations]

    generated = len(prompts) * args.new_tokens
    same = sum(a == b for a, b in zip(outputs["tunelab"], outputs["hf"]))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "precision": precision.reason,
        "allocator": allocator.active_allocator(),
        "prompt": args.prompt,
        "rows": len(prompts),
        "new_tokens": args.new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "tunelab_seconds": best["tunelab"],
        "hf_seconds": best["hf"],
        "tunelab_tokens_per_s": generated / best["tunelab"],
        "hf_tokens_per_s": generated / best["hf"],
        "ratio": best["hf"] / best["tunelab"],
        "same_tokens_rows": same,
        "tunelab_batch": f"{args.batch} rows" if args.batch else "sized by tokens",
        "tunelab_batches": run.batches,
    }
    print(f"{'':10} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'HF':10} {best['hf']:8.1f} {result['hf_tokens_per_s']:9.0f}   generate, batch 16, left padding")
    print(f"{'tunelab':10} {best['tunelab']:8.1f} {result['tunelab_tokens_per_s']:9.0f}   "
          f"{result['tunelab_batches']} batches ({result['tunelab_batch']}), shared prefix")
    print(f"ratio {result['ratio']:.2f}x; identical generations on {same}/{len(prompts)} rows; "
          f"{result['allocator']} malloc (TUNELAB_ALLOCATOR=system for glibc's)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
