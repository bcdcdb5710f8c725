"""Benchmark: tunelab's LoRA SFT vs Hugging Face TRL SFTTrainer + PEFT, same work, same run.

    .venv/bin/pip install trl                      # only the benchmark needs it
    .venv/bin/python bench/train_throughput.py --steps 10 --json out.json

Work, identical on both sides: SmolLM2-135M-Instruct (bf16 weights where the CPU has
AMX), the first rows of tunelab's Banking77 train split as conversational
prompt/completion ([system, user] -> [assistant]), loss on the completion only,
LoRA r=16 alpha=32 dropout 0 on all linear layers, AdamW lr 2e-4, batch --batch
examples, max length 128, --warmup steps not timed, then --steps timed steps.

TRL is given its best fair settings on this CPU: bf16 autocast (bf16=True), no
gradient checkpointing (TRL 1.x turns it on by default; memory is ample here), no
padding-free packing (it needs flash attention, which a CPU does not have).

Each side runs in its own subprocess (so peak RSS is that side's alone); rounds
alternate tunelab, TRL, tunelab, TRL, and each side's best round is reported.
Tokens/s counts real (non-padding) input tokens of the timed steps, on both sides.

MFU: model FLOPs per real token are counted with one formula for both sides:
4 x (non-embedding parameters) for a frozen base with LoRA (forward + input gradient;
no weight gradient), plus 4 x LM-head parameters x the share of tokens that carry a
loss (the head is only needed there), plus attention 4 x layers x T x d_model.
The bf16 and fp32 matmul peaks are measured in the same run (2048^3 matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Classify the intent."


def _rows(n: int):
    from tunelab.config import DataConfig
    from tunelab.data.records import read_conversations
    from tunelab.data.split import split_conversations

    data = DataConfig(path=REPO / "examples/banking77/train.csv", format="csv", input_column="text",
                      output_column="category", system_prompt=SYSTEM)
    return split_conversations(read_conversations(data)).train[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_tunelab(args: argparse.Namespace) -> dict:
    import torch

    from tunelab.config import LoraConfig
    from tunelab.data.batches import collate
    from tunelab.data.tokenize import tokenize_conversations
    from tunelab.models import attach_lora, load_model, resolve_model
    from tunelab.train.loop import choose_precision, make_optimizer
    from tunelab.train.sft import backward_on, epoch_stream

    torch.manual_seed(0)
    precision = choose_precision("auto")
    model, tokenizer = load_model(resolve_model("smollm2-135m-instruct"), dtype=precision.weights_dtype)
    model.config.use_cache = False
    model = attach_lora(model, LoraConfig(rank=16, alpha=32))
    total = args.warmup + args.steps
    examples, _ = tokenize_conversations(tokenizer, _rows(total * args.batch), max_length=128)
    stream = epoch_stream(examples, args.batch, 1.0, seed=0)
    optimizer, scheduler = make_optimizer(model, 2e-4, 0.0, total, 0)
    model.train()
    tokens = trained = 0
    for step, micro in enumerate(stream[:total]):
        if step == args.warmup:
            started = time.perf_counter()
        batch = collate(micro, tokenizer.pad_token_id)
        backward_on(model, [batch], precision)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens += batch.real_tokens
            trained += batch.trained_tokens
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "trained_tokens": trained, "peak_rss_mb": _peak_rss_mb()}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import resolve_model
    from tunelab.train.loop import choose_precision

    torch.manual_seed(0)
    precision = choose_precision("auto")
    path = resolve_model("smollm2-135m-instruct").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.weights_dtype)
    total = args.warmup + args.steps
    rows = _rows(total * args.batch)
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r.prompt_messages[-1].content}],
         "completion": [{"role": "assistant", "content": r.answer}]}
        for r in rows
    ])
    config = SFTConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=2e-4, lr_scheduler_type="constant", max_length=128, bf16=precision.bf16, use_cpu=True,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1000,
        dataloader_num_workers=0, seed=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)

    counts = {"tokens": 0, "trained": 0, "batches": 0}
    collate = trainer.data_collator

    def counting_collator(features):  # counts what each step really consumes
        batch = collate(features)
        counts["batches"] += 1
        if counts["batches"] > args.warmup:
            counts["tokens"] += int(batch["attention_mask"].sum())
            counts["trained"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    trainer.data_collator = counting_collator
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, _control, **kwargs):
            if state.global_step == args.warmup:
                clock["start"] = time.perf_counter()

        def on_step_end(self, _args, state, _control, **kwargs):
            if state.global_step == total:
                clock["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    return {"seconds": clock["end"] - clock["start"], "tokens": counts["tokens"], "trained_tokens": counts["trained"],
            "peak_rss_mb": _peak_rss_mb()}


def matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def flops_per_token(trained_share: float, mean_length: float) -> float:
    from transformers import AutoConfig

    from tunelab.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    d, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)  # q, o, k, v, gate, up, down
    head = d * cfg.vocab_size
    return 4 * body + 4 * head * trained_share + 4 * layers * mean_length * d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=16, help="examples per step, both sides")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each side's best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--side", choices=["tunelab", "trl"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--tmp", default="/tmp/tunelab-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        result = run_tunelab(args) if args.side == "tunelab" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return

    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in ("tunelab", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} run failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            if side not in best or r["tokens_per_s"] > best[side]["tokens_per_s"]:
                best[side] = r

    bf16_peak, fp32_peak = matmul_peak_gflops("bfloat16"), matmul_peak_gflops("float32")
    ours, trl = best["tunelab"], best["trl"]
    share = ours["trained_tokens"] / ours["tokens"]
    mean_len = ours["tokens"] / (args.steps * args.batch)
    fpt = flops_per_token(share, mean_len)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "tokens_definition": "real (non-padding) input tokens of the timed steps",
        "tunelab_tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"],
        "ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
        "tunelab_trained_tokens_per_s": ours["trained_tokens"] / ours["seconds"],
        "trl_trained_tokens_per_s": trl["trained_tokens"] / trl["seconds"],
        "tunelab_peak_rss_mb": ours["peak_rss_mb"], "trl_peak_rss_mb": trl["peak_rss_mb"],
        "rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "bf16_peak_gflops": bf16_peak, "fp32_peak_gflops": fp32_peak, "flops_per_token": fpt,
        "tunelab_mfu": ours["tokens_per_s"] * fpt / 1e9 / bf16_peak,
        "trl_mfu": trl["tokens_per_s"] * fpt / 1e9 / bf16_peak,
    }
    print(f"{'':8} {'tokens/s':>9} {'trained tok/s':>14} {'peak RSS MB':>12} {'MFU':>6}")
    for name, r, mfu in (("TRL", trl, result["trl_mfu"]), ("tunelab", ours, result["tunelab_mfu"])):
        print(f"{name:8} {r['tokens_per_s']:9.0f} {r['trained_tokens'] / r['seconds']:14.0f} "
              f"{r['peak_rss_mb']:12.0f} {100 * mfu:5.1f}%")
    print(f"ratio {result['ratio']:.2f}x tokens/s, {result['rss_ratio']:.2f}x peak RSS; "
          f"bf16 matmul peak {bf16_peak:.0f} GFLOP/s, fp32 {fp32_peak:.0f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
