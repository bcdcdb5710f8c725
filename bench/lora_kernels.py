"""How to compute many LoRA adapters in one batch on this CPU: the three arithmetics of serve/multi_lora.py.

    python bench/lora_kernels.py [--json out.json]

For SmolLM2-135M's linear shapes (q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576),
slots for 8 adapters of rank 16, and batches as the server runs them (decode: 8 or 32 rows of one
token; prefill: 4 prompts of 64 tokens), each with 1, 2 or 8 distinct adapters (and 8 with a quarter
of the rows on the base), it times one forward of all seven layers per kernel:

    grouped    per adapter in the batch: its rows through A then B      (PEFT's mixed batch, LoRAX's fallback)
    masked     all rows through every slot, other slots' columns zeroed (HabanaAI vllm-fork #223)
    gathered   each row's A and B gathered, then batched matmuls       (vLLM's CPU path)

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
                 repeats: int) -> float:
    """Median seconds for one pass through all seven layers (each fed an input of its own width)."""
    times = []
    with torch.no_grad(), rows_use(rows):
        for _ in range(repeats):
            started = time.perf_counter()
            for layer in stack:
                layer(x[layer.base.in_features])
            times.append(time.perf_counter() - started)
    return statistics.median(times[len(times) // 5 :])  # the first fifth warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", default=None, help="Write the results here too.")
    args = parser.parse_args()
    cpu = detect_hardware().describe()
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    stack = layers()
    results = []
    for batch_name, (rows, tokens) in BATCHES.items():
        x = {w: torch.randn(rows, tokens, w) for w in {576, 1536}}
        base = time_forward(stack, x, None, args.repeats)
        for mix_name, mix in MIXES.items():
            slots = mix(rows)
            row = {"batch": batch_name, "mix": mix_name, "base_ms": base * 1e3}
            for kernel in KERNELS:
                row[kernel] = time_forward(stack, x, RowSlots.of(slots, kernel), args.repeats) / base
            results.append(row)
    header = f"{'batch':14} {'adapters':14} {'base ms':>8} " + " ".join(f"{k:>9}" for k in KERNELS)
    print(header)
    for row in results:
        print(f"{row['batch']:14} {row['mix']:14} {row['base_ms']:8.3f} " + " ".join(f"{row[k]:9.2f}" for k in KERNELS))
    print("(each kernel: time of the seven layers with LoRA / without; lower is better)")
    summary = {"cpu": cpu, "results": results}
    print("RESULT " + json.dumps(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
