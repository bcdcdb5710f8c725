"""Benchmark: LoRA over a quantized frozen base (int8, nf4) against the bf16 base, same run.

    .venv/bin/pip install --no-deps bitsandbytes         # the `quant` extra
    .venv/bin/python bench/quantized_base.py --steps 4 --json out.json

Work, identical on every side: SmolLM2-135M-Instruct, the first rows of tunelab's
Banking77 train split ([system, user] -> [assistant], loss on the answer), LoRA r=16
alpha=32 on all linear layers (fp32 adapter), AdamW lr 2e-4, batch --batch, bf16
autocast where the CPU has AMX, --warmup untimed steps then --steps timed steps.

Sides: `bf16` (the base in the compute dtype), then every tunelab method that
`tunelab.model.quantize.quantization_available` allows here (`int8`, `nf4`), loaded the
way tunelab loads them (`quantization_config` for from_pretrained, then
`quantize_base`). With --candidates, also the libraries measured when choosing,
each where its package is installed: bitsandbytes int8 (Linear8bitLt), torchao int8
weight-only (`pip install --no-deps torchao`) and HQQ 8-bit (`pip install --no-deps
hqq einops termcolor`).

Each side runs in its own subprocess (so peak RSS is that side's alone); rounds
alternate the sides and each side's fastest round is kept (the machine is shared).
Reported per side:

    base MB         bytes of the base's weights as stored (scales included, tied weights once)
    copies MB       dequantized weight copies autograd keeps for backward (one forward): memory
                    a quantized base gives back while training; 0 for the bf16 base
    peak RSS MB     the process's peak resident memory (ru_maxrss) over load + training
    train tok/s     real (non-padding) input tokens per second of the timed training steps
    eval tok/s      the same batches, forward only in eval mode (validation loss, evaluation)
    first loss      loss of the first batch before any update: how far quantization moved the base
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
CANDIDATES = {"bnb-int8": "bitsandbytes", "torchao-int8": "torchao", "hqq-int8": "hqq"}  # side -> its package
# PEFT's 'all-linear' finds nn.Linear only; HQQLinear is not one, so HQQ needs the names.
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(side: str, dtype):
    """The base as tunelab loads it, quantized per side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.model.kernels import attention_implementation
    from tunelab.model.load import resolve_model
    from tunelab.model.quantize import quantization_config

    path = resolve_model("smollm2-135m-instruct").path
    if side == "bnb-int8":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True)
    elif side == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    elif side == "hqq-int8":
        config = None  # transformers 5.23's HqqConfig loader raises "HQQ is not available yet": hqq directly, below
    else:
        config = quantization_config("none" if side == "bf16" else side, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention_implementation("tunelab"),
                                                 quantization_config=config)
    if side == "hqq-int8":
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH_BACKPROP)  # re-dequantize in backward rather than keep a copy
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        for name, linear in linears:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, HQQLinear(linear, BaseQuantizeConfig(nbits=8, group_size=64),
                                                                 compute_dtype=dtype, device="cpu"))
    return model, tokenizer


def _weight_copy_bytes(model, batch, precision) -> int:
    """Bytes of dequantized weight copies autograd keeps for backward, over one forward.

    A saved tensor counts when it is not a parameter and has the shape of a linear
    layer's weight (or its transpose): activations are 3-D or (tokens, features).
    """
    import torch

    from tunelab.model.scoring import token_loss_sum

    shapes = {(m.out_features, m.in_features) for name, m in model.named_modules()
              if hasattr(m, "out_features") and "lora_" not in name}  # LoRA's own bf16 casts are not base copies
    shapes |= {(i, o) for o, i in shapes}
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p) is torch.nn.Parameter}
    copies: dict[int, int] = {}

    def pack(t):
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point() and tuple(t.shape) in shapes:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                copies[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast():
        token_loss_sum(model, batch)
    return sum(copies.values())


def run_side(args: argparse.Namespace) -> dict:
    import torch
    from train_throughput import _rows

    from tunelab.config import LoraConfig
    from tunelab.data.batches import collate
    from tunelab.data.tokenize import tokenize_conversations
    from tunelab.model.load import attach_lora
    from tunelab.model.precision import choose_precision
    from tunelab.model.quantize import quantize_base, weight_bytes
    from tunelab.model.scoring import token_loss_sum
    from tunelab.training.step import make_optimizer

    torch.manual_seed(0)
    precision = choose_precision("auto")
    started = time.perf_counter()
    model, tokenizer = _load(args.side, precision.weights_dtype)
    if args.side in ("bf16", "int8", "nf4"):
        quantize_base(model, "none" if args.side == "bf16" else args.side, precision.weights_dtype)
    load_seconds = time.perf_counter() - started  # loading + quantizing
    model.config.use_cache = False
    base_bytes = weight_bytes(model)
    targets = LLAMA_LINEARS if args.side == "hqq-int8" else "all-linear"
    model = attach_lora(model, LoraConfig(rank=16, alpha=32, target_modules=targets))
    total = args.warmup + args.steps
    examples, _ = tokenize_conversations(tokenizer, _rows(total * args.batch), max_length=128)
    batches = [collate(examples[i * args.batch:(i + 1) * args.batch], tokenizer.pad_token_id) for i in range(total)]
    optimizer, _ = make_optimizer(model, 2e-4, 0.0, total, 0)
    model.train()
    losses, seconds, tokens = [], 0.0, 0
    for step, batch in enumerate(batches):  # the step of tunelab.training.recipe, without accumulation
        t0 = time.perf_counter()
        with precision.autocast():
            loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n)
        if step >= args.warmup:
            seconds += time.perf_counter() - t0
            tokens += batch.real_tokens
    train_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    model.eval()
    eval_seconds = 0.0
    with torch.no_grad():
        for batch in batches[args.warmup:]:
            t0 = time.perf_counter()
            with precision.autocast():
                token_loss_sum(model, batch)
            eval_seconds += time.perf_counter() - t0
    model.train()
    copies = _weight_copy_bytes(model, batches[0], precision)  # last: its extra forward is not in the peak RSS
    return {"base_bytes": base_bytes, "weight_copy_bytes": copies, "load_seconds": load_seconds,
            "peak_rss_mb": train_peak_rss_mb,
            "tokens": tokens, "seconds": seconds, "eval_seconds": eval_seconds,
            "first_loss": losses[0], "losses": losses}


def sides(with_candidates: bool) -> tuple[list[str], dict[str, str]]:
    """Sides to run, and why each left out is left out."""
    import importlib.util

    from tunelab.model.quantize import quantization_available

    run, skipped = ["bf16"], {}
    for method in ("int8", "nf4"):
        ok, reason = quantization_available(method)
        (run.append(method) if ok else skipped.__setitem__(method, reason))
    for side, package in CANDIDATES.items() if with_candidates else ():
        if importlib.util.find_spec(package) is None:
            skipped[side] = f"{package} is not installed"
        else:
            run.append(side)
    return run, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=16, help="examples per step, every side")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each side's fastest is kept")
    parser.add_argument("--candidates", action="store_true", help="also torchao int8 and HQQ 8-bit, if installed")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return

    run, skipped = sides(args.candidates)
    best: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for side in [s for s in run if s not in failed]:
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # a candidate that fails is a result too: its last error line
                failed[side] = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
                continue
            r = json.loads(line[len("RESULT "):])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["eval_tokens_per_s"] = r["tokens"] / r["eval_seconds"]
            if side not in best or r["tokens_per_s"] > best[side]["tokens_per_s"]:
                best[side] = r
    if "bf16" not in best:
        sys.exit(f"the bf16 baseline failed: {failed.get('bf16')}")
    ref = best["bf16"]
    for r in best.values():
        r["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["base_ratio"] = r["base_bytes"] / ref["base_bytes"]
    print(f"{'side':13} {'base MB':>8} {'copies MB':>9} {'peak RSS MB':>12} {'train tok/s':>12} {'ratio':>6} "
          f"{'eval tok/s':>11} {'first loss':>11}")
    for side, r in best.items():
        print(f"{side:13} {r['base_bytes'] / 1e6:8.1f} {r['weight_copy_bytes'] / 1e6:9.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['tokens_per_s']:12.0f} {r['speed_ratio']:5.2f}x {r['eval_tokens_per_s']:11.0f} "
              f"{r['first_loss']:11.4f}")
    for side, why in {**skipped, **failed}.items():
        print(f"{side:13} not measured: {why}")
    if args.json:
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "batch": args.batch,
                  "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "sides": best,
                  "not_measured": {**skipped, **failed}}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
