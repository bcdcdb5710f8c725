"""How to compute many LoRA adapters in one batch on this CPU: the arithmetics of serve/multi_lora.py.

    python bench/lora_kernels.py [--json out.json]

For SmolLM2-135M's linear shapes (q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576),
slots for 8 adapters of rank 16, and batches as the server runs them (decode: 8 or 32 rows of one
token; prefill: 4 prompts of 64 tokens), each with 1, 2 or 8 distinct adapters (and 8 with a quarter
of the rows on the base), it times one forward of all seven layers per kernel:

    grouped    per adapter in the batch: its rows through A then B      (PEFT's mixed batch, LoRAX's fallback)
    masked     all rows through the slots in use, other slots' columns zeroed (HabanaAI vllm-fork #223)
    gathered   each row's A and B gathered, then batched matmuls       (vLLM's CPU path)
    segmented  rows sorted by slot, torch's grouped_mm through A then B
    fused      one native call per layer (serve/native_lora.cpp), where it builds

and reports each as a ratio to the base layers alone (1.00 = LoRA costs nothing), measured in the
same run. The server's default (`serve.lora_kernel`) is whichever these numbers favour; the table for
each CPU we ran it on is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tunelab.model.precision import detect_hardware
from tunelab.serve import native_lora
from tunelab.serve.multi_lora import KERNELS, MultiLoraLinear, RowSlots, rows_use

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
SLOTS, RANK = 8, 16
BATCHES = {"decode 8x1": (8, 1), "decode 32x1": (32, 1), "prefill 4x64": (4, 64)}
MIXES = {"1 adapter": lambda rows: [1] * rows, "2 adapters": lambda rows: [1 + i % 2 for i in range(rows)],
         "8 adapters": lambda rows: [1 + i % 8 for i in range(rows)],
         "8 + base rows": lambda rows: [0 if i % 4 == 3 else 1 + i % 8 for i in range(rows)]}


def layers() -> list[MultiLoraLinear]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for fan_in, fan_out in SHAPES.values():
        layer = MultiLoraLinear(torch.nn.Linear(fan_in, fan_out, bias=False), SLOTS + 1, RANK)
        for slot in range(1, SLOTS + 1):
            layer.write_slot(slot, torch.randn(RANK, fan_in, generator=gen) * 0.01,
                             torch.randn(fan_out, RANK, generator=gen) * 0.01)
        out.append(layer)
    return out


def time_forward(stack: list[MultiLoraLinear], x: dict[int, torch.Tensor], rows: RowSlots | None,
                 passes: int, clock=time.perf_counter) -> float:
    """Seconds for one pass through all seven layers (each fed an input of its own width), averaged over `passes`."""
    with torch.no_grad(), rows_use(rows):
        started = clock()
        for _ in range(passes):
            for layer in stack:
                layer(x[layer.base.in_features])
        return (clock() - started) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds; each times the base and every kernel once")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, for a machine busy with other work (one thread only)")
    parser.add_argument("--json", default=None, help="Write the results here too.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu needs --threads 1 (idle workers spinning would count as work)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cpu = detect_hardware().describe()
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    stack = layers()
    native = native_lora.load()  # the fused kernel, where it builds
    kernels = [*KERNELS, "fused"] if native is not None else list(KERNELS)
    results = []
    for batch_name, (rows, tokens) in BATCHES.items():
        x = {w: torch.randn(rows, tokens, w) for w in {576, 1536}}
        for mix_name, mix in MIXES.items():
            contenders = {"base": None, **{k: RowSlots.of(mix(rows), k, native) for k in kernels}}
            times: dict[str, list[float]] = {name: [] for name in contenders}
            # Interleaved rounds, medians: a slow moment of the machine lands on every contender alike.
            for round_ in range(args.rounds + 2):
                for name, slots in contenders.items():
                    elapsed = time_forward(stack, x, slots, passes=5, clock=clock)
                    if round_ >= 2:  # two rounds of warm-up
                        times[name].append(elapsed)
            base = statistics.median(times["base"])
            row = {"batch": batch_name, "mix": mix_name, "base_ms": base * 1e3}
            for kernel in kernels:
                row[kernel] = statistics.median(times[kernel]) / base
            results.append(row)
    header = f"{'batch':14} {'adapters':14} {'base ms':>8} " + " ".join(f"{k:>9}" for k in kernels)
    print(header)
    for row in results:
        print(f"{row['batch']:14} {row['mix']:14} {row['base_ms']:8.3f} " + " ".join(f"{row[k]:9.2f}" for k in kernels))
    print("(each kernel: time of the seven layers with LoRA / without; lower is better)")
    summary = {"cpu": cpu, "results": results}
    print("RESULT " + json.dumps(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
