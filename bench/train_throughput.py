"""Benchmark: tunelab's LoRA SFT vs Hugging Face TRL SFTTrainer + PEFT, same work, same run.

    .venv/bin/pip install trl                      # only the benchmark needs it
    .venv/bin/python bench/train_throughput.py --steps 10 --json out.json
    .venv/bin/python bench/train_throughput.py --method lora,dora,int8,nf4,packed --steps 10

Work, identical on both sides: SmolLM2-135M-Instruct (bf16 weights where the CPU has
AMX), the first rows of tunelab's Banking77 train split as conversational
prompt/completion ([system, user] -> [assistant]), loss on the completion only,
LoRA r=16 alpha=32 dropout 0 on all linear layers, AdamW lr 2e-4, batch --batch
examples (64 by default), max length 128, --warmup steps not timed, then --steps timed steps.

TRL is given its best fair settings on this CPU: bf16 autocast (bf16=True), no
gradient checkpointing (TRL 1.x turns it on by default; memory is ample here), rows
grouped by length for padded methods (train_sampling_strategy="group_by_length", from
session 14; tunelab's side groups by length too; tunelab puts its largest batch first, TRL's
sampler the batch with the longest example), no
torch_compile (it compiles the whole model: minutes on 2 cores, and again for new
sequence lengths, which 8 steps cannot pay back). tunelab's side sets up as
training.setup does for a run long enough to pay for compiling (train.compile_layers: auto
compiles from 300,000 tokens to train; this benchmark's few steps measure the speed such
a run trains at): the RMSNorm and MLP activations compiled (tunelab.model.kernels.compiled), and
for every method but dora the whole decoder layers too, before the untimed warm-up; the
compile's seconds are reported (`tunelab_compile_seconds`) and are not in the timing.
--no-compile-layers keeps the layers eager (what a shorter run gets).
Except for `packed`, both sides train on padded rows.

--method (repeatable or comma-separated; default lora) picks what both sides do, one
result row each; a method is a branch of each side's model setup or collate:

    lora     the work above.
    dora     LoRA with use_dora=True on both sides (PEFT's DoRA).
    int8     a frozen 8-bit base. tunelab: its built-in int8 (Int8Linear: int8 weights, one
             scale per row; load_model + quantize_base, as training.setup does). TRL: the model
             loaded with BitsAndBytesConfig(load_in_8bit=True), what a TRL user does for an
             8-bit base (bitsandbytes LLM.int8 Linear8bitLt; it trains on CPU with
             bitsandbytes 0.50.2. Where it cannot, the row says "failed" with the error,
             never a number).
    w8a8     tunelab: int8 weights as int8, and the base's products in int8 too (W8A8Linear: each input row
             quantized on the fly, int32 sums; the input gradient likewise). TRL: as int8 (bitsandbytes'
             LLM.int8, what a TRL user reaches for; not run against w8a8 yet).
    nf4      a frozen 4-bit NormalFloat base (QLoRA), bitsandbytes on both sides, the same
             BitsAndBytesConfig as tunelab's loader: nf4, double-quantized scales, compute
             dtype bf16 where the CPU has AMX (else fp32).
             For int8 and nf4, TRL casts the LoRA weights of a quantized model to bf16 (the
             QLoRA paper's recipe); tunelab keeps them fp32. The LM head stays unquantized
             on both sides.
    packed   padding-free packing. tunelab: each step's examples collated by collate_packed
             into rows as wide as the step's longest example (train.pack_length's default,
             row_capacity in tunelab/data/pack.py). TRL: SFTConfig(packing=True) (strategy "bfd": the
             dataset is packed into sequences of at most max_length tokens, and each batch is
             flattened into one padding-free row with position_ids and no attention mask;
             transformers derives a block-diagonal causal mask from the position_ids, so it
             runs without flash attention, with SDPA's dense masked attention over the row).
             TRL's batch counts packed sequences of max_length tokens, so TRL gets
             per_device_train_batch_size = max(1, round(batch x mean tokens / max_length)):
             both sides take about the same tokens per step.

Both sides' processes run on the same malloc: tcmalloc where the system has it (--allocator;
tunelab's CLI relaunches itself on it, see tunelab/cli/allocator.py), which TRL gains from too.

Each side runs in its own subprocess (so peak RSS is that side's alone); for each method
the sides alternate tunelab, TRL, and with --rounds the methods repeat in turn; each
side's best round is reported. Tokens/s counts real (non-padding) input tokens of the
timed steps, on both sides (trained tokens/s: tokens that carry the loss).

MFU counts model FLOPs, not executed FLOPs, with one formula for both sides:
4 x (the parameters of every linear layer, the LM head included and counted once though
it is tied to the embeddings) per token, for a frozen base with LoRA (forward + input
gradient, no weight gradient; the adapters are negligible), plus attention
4 x layers x T x d_model, T the mean tokens per example. It ignores that tunelab computes
the head only at trained positions and a shared prompt prefix once per batch: skipped
work counts as done. The bf16 and fp32 matmul peaks are measured in the same run
(2048^3 matmuls; 512^3 where a dtype is emulated, see matmul_peak_gflops); each side's MFU is
against the peak of the precision it computed in. Both sides take `precision: auto`'s choice
(tunelab/model/precision.py: bf16 where it measures faster on this CPU), printed beside each row
with the CPU model and its vector extensions.

tunelab's side also replays the matrix products of its timed steps alone
(bench/matmul_replay.py): `tunelab_matmul_share` (their share of the step),
`tunelab_matmul_gflops` and `tunelab_mfu_ceiling` (the MFU if nothing else took time).
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

from tunelab.cli import allocator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Classify the intent."
MAX_LENGTH = 128
METHODS = ("lora", "dora", "int8", "w8a8", "nf4", "packed")


def _rows(n: int):
    from tunelab.config import DataConfig
    from tunelab.data.read import read_conversations
    from tunelab.data.split import split_conversations

    data = DataConfig(path=REPO / "examples/banking77/train.csv", format="csv", input_column="text",
                      output_column="category", system_prompt=SYSTEM)
    return split_conversations(read_conversations(data)).train[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _mean_tokens(tokenizer, rows) -> float:
    """Mean tokens per example under the chat template: what both sides' packing is sized by."""
    from tunelab.data.tokenize import tokenize_conversations

    examples, _ = tokenize_conversations(tokenizer, rows, max_length=MAX_LENGTH)
    return sum(e.length for e in examples) / len(examples)


def run_tunelab(args: argparse.Namespace) -> dict:
    import matmul_replay  # beside this script
    import torch

    from tunelab.config import LoraConfig
    from tunelab.data.batches import collate
    from tunelab.data.pack import collate_packed
    from tunelab.data.tokenize import tokenize_conversations
    from tunelab.model.kernels.compiled import use_compiled_kernels, use_compiled_layers
    from tunelab.model.load import attach_lora, decoder_layers, load_model, resolve_model
    from tunelab.model.precision import choose_precision
    from tunelab.model.quantize import quantize_base
    from tunelab.training.objectives import Sft
    from tunelab.training.setup import epoch_stream
    from tunelab.training.step import ObjectiveLoss, backward_on, make_optimizer

    torch.manual_seed(0)
    precision = choose_precision("auto")
    quantize = args.method if args.method in ("int8", "w8a8", "nf4") else "none"
    model, tokenizer = load_model(resolve_model("smollm2-135m-instruct"), dtype=precision.weights_dtype,
                                  quantize=quantize)
    quantize_base(model, quantize, precision.weights_dtype)  # int8: here, in place; nf4: done while loading
    model.config.use_cache = False
    model = attach_lora(model, LoraConfig(rank=16, alpha=32, use_dora=args.method == "dora"))
    loss = ObjectiveLoss(model, Sft())  # the run's SFT loss, as training.setup builds it
    total = args.warmup + args.steps
    examples, _ = tokenize_conversations(tokenizer, _rows(total * args.batch), max_length=MAX_LENGTH)
    stream = epoch_stream(examples, args.batch, 1.0, seed=0)
    model.train()

    def collate_step(micro):
        return (collate_packed(micro, tokenizer.pad_token_id) if args.method == "packed"  # rows as wide as the longest
                else collate(micro, tokenizer.pad_token_id))

    compile_started = time.perf_counter()  # as training.setup does, before the first step
    kernels = use_compiled_kernels(model, torch.bfloat16 if precision.bf16 else None)
    layers = args.compile_layers and args.method != "dora" and not kernels.unavailable
    if layers:  # as setup._compile_layers: compile on one forward + backward, then drop its gradients
        use_compiled_layers(decoder_layers(model))
        backward_on(loss, [collate_step(stream[0])], precision)
        model.zero_grad(set_to_none=True)
    compile_seconds = time.perf_counter() - compile_started
    optimizer, scheduler = make_optimizer(model, 2e-4, 0.0, total, 0)
    tokens = trained = counted = 0
    for step, micro in enumerate(stream[:total]):
        if step == args.warmup:
            started = time.perf_counter()
        batch = collate_step(micro)
        backward_on(loss, [batch], precision)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens += batch.real_tokens
            trained += batch.trained_tokens
            counted += len(micro)
    seconds = time.perf_counter() - started
    peak_rss_mb = _peak_rss_mb()  # before the replay below allocates anything

    def timed_steps_again() -> None:  # the same micro-batches, forward and backward: the same products
        for micro in stream[args.warmup : total]:
            batch = collate_step(micro)
            backward_on(loss, [batch], precision)
            optimizer.zero_grad(set_to_none=True)

    calls = matmul_replay.record(timed_steps_again)
    return {"seconds": seconds, "tokens": tokens, "trained_tokens": trained, "examples": counted,
            "precision": "bf16" if precision.bf16 else "fp32", "peak_rss_mb": peak_rss_mb, "setting": "rows as wide as the longest example" if args.method == "packed" else "",
            "compile_seconds": compile_seconds,
            "kernels": kernels.describe() + ("; whole decoder layers compiled" if layers else ""),
            "matmul_seconds": matmul_replay.replay_seconds(calls), "matmul_flops": sum(c.flops for c in calls)}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.model.load import resolve_model
    from tunelab.model.precision import choose_precision

    torch.manual_seed(0)
    precision = choose_precision("auto")
    path = resolve_model("smollm2-135m-instruct").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    quantization = None
    if args.method in ("int8", "w8a8"):
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    elif args.method == "nf4":  # the same config as tunelab.model.quantize.quantization_config
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=precision.weights_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.weights_dtype, quantization_config=quantization)
    total = args.warmup + args.steps
    rows = _rows(total * args.batch)
    batch, setting = args.batch, ""
    if args.method == "packed":  # TRL's batch is packed sequences of max_length tokens: about the same tokens per step
        batch = max(1, round(args.batch * _mean_tokens(tokenizer, rows) / MAX_LENGTH))
        setting = f"batch {batch} packed sequences of <= {MAX_LENGTH} tokens"
        # A packed sequence holds whole examples only (bfd), so fewer tokens than max_length: spare rows keep
        # the timed steps from reaching the end of the data (a short last batch, then a new epoch).
        rows = _rows(2 * total * args.batch)
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r.prompt_messages[-1].content}],
         "completion": [{"role": "assistant", "content": r.answer}]}
        for r in rows
    ])
    config = SFTConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=batch, max_steps=total,
        learning_rate=2e-4, lr_scheduler_type="constant", max_length=MAX_LENGTH, bf16=precision.bf16, use_cpu=True,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1000,
        dataloader_num_workers=0, seed=0, packing=args.method == "packed",
        # Padded rows: transformers' length grouping (its LengthGroupedSampler), as tunelab's side groups by
        # length, so neither side pays for padding that a setting avoids. Packed rows have no padding to group.
        train_sampling_strategy="random" if args.method == "packed" else "group_by_length",
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                             use_dora=args.method == "dora")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)

    per_batch: list[tuple[int, int, int]] = []  # (tokens, trained tokens, examples) of each batch, in order
    collate = trainer.data_collator

    def counting_collator(features):  # counts what each step really consumes
        batch = collate(features)
        if "attention_mask" in batch:
            tokens, examples = int(batch["attention_mask"].sum()), len(batch["input_ids"])
        else:  # padding-free (packing): one row of real tokens; each example restarts its position_ids at 0
            tokens, examples = batch["input_ids"].numel(), int((batch["position_ids"] == 0).sum())
        per_batch.append((tokens, int((batch["labels"][:, 1:] != -100).sum()), examples))
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
    # Batches warmup..total-1 are the timed steps' (accelerate's loader collates one batch ahead, so
    # per_batch may hold one more, never trained on).
    tokens, trained, examples = (sum(x) for x in zip(*per_batch[args.warmup : total]))
    return {"seconds": clock["end"] - clock["start"], "tokens": tokens, "trained_tokens": trained,
            "examples": examples, "precision": "bf16" if precision.bf16 else "fp32", "peak_rss_mb": _peak_rss_mb(),
            "setting": setting}


def matmul_peak_gflops(dtype_name: str, n: int = 2048, repeats: int = 10, budget_s: float = 10.0) -> dict:
    """{"gflops", "n"}: the best rate of n^3 matrix products in this dtype. Where the dtype is emulated (bf16 on an
    AVX2-only CPU: a 2048^3 product took minutes there), a 512^3 product says so in milliseconds, and the
    measurement stops at the size that fits `budget_s`, reporting that size."""
    import torch

    dtype = getattr(torch, dtype_name)
    for size in (512, n):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up (oneDNN builds its kernel on the first call)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        rate = 2 * size**3 / best / 1e9
        if size == n or 2 * n**3 / (rate * 1e9) * (repeats + 1) > budget_s:
            return {"gflops": rate, "n": size}
    raise AssertionError("unreachable")


def flops_per_token(mean_length: float) -> float:
    """Model FLOPs per token, frozen base + LoRA: 4 x linear parameters (head once) + attention 4 x layers x T x d."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.model.load import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(cfg)
    # The LM head is an nn.Linear whose weight is the embedding matrix (tied): counted here once, as the head.
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return 4 * linear + 4 * cfg.num_hidden_layers * mean_length * cfg.hidden_size


def run_side(side: str, method: str, args: argparse.Namespace) -> dict:
    """One side's run in its own process: its result, or {"error": why} (the last lines of its stderr)."""
    cmd = [sys.executable, __file__, "--side", side, "--method", method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--compile-layers" if args.compile_layers else "--no-compile-layers"]
    env = None
    if args.allocator == "tcmalloc":  # both sides: the allocator is the process's, not the trainer's
        library = allocator.find_tcmalloc()
        if library is None:
            raise SystemExit(f"--allocator tcmalloc: no tcmalloc library found ({allocator.INSTALL_HINT})")
        env = allocator.preload_env(os.environ, library)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        return {"error": " | ".join(lines[-3:]) or f"exit status {out.returncode}"}
    r = json.loads(line[len("RESULT "):])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return r


def summarize(method: str, ours: dict, trl: dict, peaks: dict[str, float]) -> dict:
    """One method's row: both sides' numbers and the ratios (None where a side failed). MFU is against the matmul
    peak of the precision that side computed in (`peaks`: GFLOP/s by "bf16" / "fp32")."""
    ok = [r for r in (ours, trl) if "error" not in r]
    fpt = flops_per_token(sum(r["tokens"] for r in ok) / sum(r["examples"] for r in ok)) if ok else None
    row: dict = {"flops_per_token": fpt}
    for name, r in (("tunelab", ours), ("trl", trl)):
        failed = "error" in r
        row |= {
            f"{name}_tokens_per_s": None if failed else r["tokens_per_s"],
            f"{name}_trained_tokens_per_s": None if failed else r["trained_tokens"] / r["seconds"],
            f"{name}_peak_rss_mb": None if failed else r["peak_rss_mb"],
            f"{name}_precision": None if failed else r["precision"],
            f"{name}_mfu": None if failed else r["tokens_per_s"] * fpt / 1e9 / peaks[r["precision"]],
            f"{name}_setting": None if failed else r["setting"],
            f"{name}_error": r.get("error"),
        }
    # tunelab's step, its matrix products replayed alone (bench/matmul_replay.py). Not for a quantized base: its
    # base products run inside custom operators (tunelab::int8_linear, bitsandbytes'), which the recorder sees
    # as single calls, not as the products inside them, so the "ceiling" would leave most products out.
    if "matmul_seconds" in ours and method not in ("int8", "w8a8", "nf4"):
        row |= {
            "tunelab_matmul_share": ours["matmul_seconds"] / ours["seconds"],
            "tunelab_matmul_gflops": ours["matmul_flops"] / ours["matmul_seconds"] / 1e9,
            "tunelab_mfu_ceiling": ours["tokens"] * fpt / ours["matmul_seconds"] / 1e9 / peaks[ours["precision"]],
        }
    if "compile_seconds" in ours:  # paid once before the first step (tunelab.model.kernels.compiled), not in the timing
        row |= {"tunelab_compile_seconds": ours["compile_seconds"], "tunelab_kernels": ours["kernels"]}
    both = len(ok) == 2
    row["ratio"] = ours["tokens_per_s"] / trl["tokens_per_s"] if both else None
    row["rss_ratio"] = ours["peak_rss_mb"] / trl["peak_rss_mb"] if both else None
    return row


def print_table(methods: dict[str, dict]) -> None:
    print(f"{'method':7} {'side':8} {'precision':9} {'tokens/s':>9} {'trained tok/s':>14} {'peak RSS MB':>12} "
          f"{'MFU':>6}  {'ratio':>6} {'RSS ratio':>9}")
    for method, row in methods.items():
        for side in ("trl", "tunelab"):
            name = "TRL" if side == "trl" else side
            if row[f"{side}_error"]:
                print(f"{method:7} {name:8} failed: {row[f'{side}_error']}")
                continue
            ratios = (f"  {row['ratio']:5.2f}x {row['rss_ratio']:8.2f}x" if side == "tunelab" and row["ratio"]
                      else "")
            print(f"{method:7} {name:8} {row[f'{side}_precision']:9} {row[f'{side}_tokens_per_s']:9.0f} {row[f'{side}_trained_tokens_per_s']:14.0f} "
                  f"{row[f'{side}_peak_rss_mb']:12.0f} {100 * row[f'{side}_mfu']:5.1f}%{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", metavar="NAME",
                        help=f"what both sides train, repeatable or comma-separated: {', '.join(METHODS)} "
                        "(default lora; see the module docstring)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=64,
                        help="examples per step, both sides (default 64: ~2,600 tokens per step, enough rows per "
                        "matrix product to use this CPU; sessions 5-13 used 16, see docs/benchmarks.md)")
    parser.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="tunelab: compile whole decoder layers for every method but dora (train.compile_layers)")
    parser.add_argument("--allocator", choices=["tcmalloc", "system"],
                        default="tcmalloc" if allocator.find_tcmalloc() and not allocator.opted_out(os.environ)
                        else "system",
                        help="malloc of both sides' processes (default tcmalloc where the system has it, unless "
                        "TUNELAB_ALLOCATOR=system; see tunelab/cli/allocator.py)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each side's best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--side", choices=["tunelab", "trl"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--tmp", default="/tmp/tunelab-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = list(dict.fromkeys(m.strip() for v in (args.method or ["lora"]) for m in v.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --method {', '.join(unknown)}: choose from {', '.join(METHODS)}")

    if args.side:
        args.method = methods[0]
        result = run_tunelab(args) if args.side == "tunelab" else run_trl(args)
        result["allocator"] = allocator.active_allocator()
        print("RESULT " + json.dumps(result))
        return

    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for method in methods:
            for side in ("tunelab", "trl"):
                print(f"running {method} / {side} ...", file=sys.stderr, flush=True)
                r = run_side(side, method, args)
                kept = best.get((method, side))
                if kept is None or "error" in kept or ("error" not in r and r["tokens_per_s"] > kept["tokens_per_s"]):
                    best[method, side] = r

    import torch

    from tunelab.model.precision import detect_hardware

    hardware = detect_hardware().describe()
    bf16, fp32 = matmul_peak_gflops("bfloat16"), matmul_peak_gflops("float32")
    peaks = {"bf16": bf16["gflops"], "fp32": fp32["gflops"]}
    rows = {m: summarize(m, best[m, "tunelab"], best[m, "trl"], peaks) for m in methods}
    lora = rows.get("lora", {})
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "cpu": hardware,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "allocator": sorted({best[k].get("allocator", "?") for k in best if "error" not in best[k]}),
        "tokens_definition": "real (non-padding) input tokens of the timed steps",
        **{k: v for k, v in lora.items() if not k.endswith(("_setting", "_error"))},
        "bf16_peak_gflops": bf16["gflops"], "bf16_peak_n": bf16["n"],
        "fp32_peak_gflops": fp32["gflops"], "fp32_peak_n": fp32["n"],
        "methods": rows,
    }
    print(f"CPU: {hardware}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(rows)
    print(f"ratio = tunelab / TRL tokens/s; MFU against the matmul peak of the side's precision: bf16 "
          f"{bf16['gflops']:.0f} GFLOP/s ({bf16['n']}^3), fp32 {fp32['gflops']:.0f} ({fp32['n']}^3); "
          f"both sides on {' / '.join(result['allocator'])} malloc")
    for method, row in rows.items():
        if row.get("tunelab_mfu_ceiling"):
            print(f"{method} tunelab: matrix products {100 * row['tunelab_matmul_share']:.0f}% of the step, at "
                  f"{row['tunelab_matmul_gflops']:.0f} GFLOP/s; with nothing else taking time, MFU would be "
                  f"{100 * row['tunelab_mfu_ceiling']:.1f}%")
    for method, row in rows.items():
        for side in ("trl", "tunelab"):
            if row[f"{side}_setting"]:
                print(f"{method} {side}: {row[f'{side}_setting']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
