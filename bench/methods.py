"""Benchmark: training methods side by side on the Banking77 demo data, this machine.

    .venv/bin/python bench/methods.py --rows 1024 --json bench/results/methods.json

Each method is a real `tunelab train` run of the demo config (SmolLM2-135M-Instruct,
batch 32, max length 128) on the same first --rows training rows, one epoch, in its
own process (so peak RSS is that method's alone), with only the fine-tune evaluated
on a few rows (the numbers here are about training). Reported per method:

    tokens/s          real (non-padding) input tokens per second of training steps
    peak RSS          the process's peak resident memory (ru_maxrss), load + train + eval
    final val loss    mean loss per trained token on the same 200 validation rows
    ratio             tokens/s against LoRA, measured in the same run

Learning rates: LoRA and DoRA 2e-3 (the demo's), full fine-tuning 1e-4 (a full model
moves ~20x further per step); packing uses the LoRA settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "banking77" / "demo.yaml"

METHODS: dict[str, list[str]] = {
    "LoRA r16 (bf16 base)": [],
    "DoRA r16 (bf16 base)": ["lora.use_dora=true"],
    "LoRA r16, packed rows": ["train.packing=true"],
    "LoRA r16, int8 base": ["lora.quantize_base=int8"],
    "full fine-tuning": ["tuning=full", "train.learning_rate=1.0e-4"],
}


def run_method(overrides: list[str], rows: int, out_dir: Path) -> dict:
    sets = [f"data.max_train_rows={rows}", "train.eval_every=0", "train.keep_checkpoints=1",
            "eval.max_rows=32", "eval.compare_base=false", "eval.forgetting_probe=false",
            f"output_dir={out_dir}", *overrides]
    command = [sys.executable, "-m", "tunelab", "train", str(DEMO), "--json"]
    for s in sets:
        command += ["--set", s]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run = Path(summary["run_dir"])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": summary["tokens_per_second"],
        "peak_rss_mb": max(r.get("peak_memory_mb", 0) for r in steps),
        "final_val_loss": summary["validation_loss"],
        "train_seconds": summary["train_seconds"],
        "steps": sum(1 for r in steps if "loss" in r),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="training rows (one epoch at batch 32)")
    parser.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunelab-bench-methods"), help="run directories")
    args = parser.parse_args()

    results = {}
    for name, overrides in METHODS.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_method(overrides, args.rows, args.out)
    base = results.get("LoRA r16 (bf16 base)", {}).get("tokens_per_s")

    print(f"\n{'method':<24} {'tokens/s':>9} {'vs LoRA':>8} {'peak RSS MB':>12} {'final val loss':>15}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24} failed: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<24} {r['tokens_per_s']:>9.0f} {ratio:>8} {r['peak_rss_mb']:>12.0f} {r['final_val_loss']:>15.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count(), "methods": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
