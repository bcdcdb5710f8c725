"""How much memory one training step needs, and how much there is: what `batch_size: auto` fits into.

    est = estimate_training_memory(model, max_tokens=128, max_trained_tokens=6, tuning="lora", lora=cfg.lora,
                                   bf16=True)
    est.total(16)                        # bytes: fixed + 16 x per_example
    est.largest_batch(budget)            # the most rows of `est.length` tokens that fit in `budget` bytes
    available_memory(torch.device("cpu"))  # Available(bytes, source): what is free now, and where that came from

The estimate has two parts:

    fixed        the weights as stored (a quantized base at its int8 / nf4 size, tied weights once), plus
                 what training adds per trainable parameter: fp32 gradient (4 B), AdamW's two fp32
                 moments (8 B) and its step's temporary (4 B); a LoRA adapter's own fp32 weights (4 B)
                 too; full tuning under bf16 autocast also holds a bf16 copy of every weight (2 B) from
                 the forward to the backward.
    per_example  activations kept for the backward pass by one row of `length` tokens, the longest of
                 the data: batches are length-grouped, so the longest batch holds the longest rows, and
                 attention grows with the square of the length.

It is a calibrated upper bound, not a simulation: see CALIBRATION for what it was checked against.
Packed rows (train.packing) are estimated as unpacked rows, and DPO pairs as one row as long as the
pair (an overestimate of the attention term).
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tunelab.config import LoraConfig
from tunelab.model.kernels.attention import NAME as TUNELAB_ATTENTION
from tunelab.model.quantize import weight_bytes

# Activations are multiplied by this. The formula alone came out below the measured activations for
# batches of 16 and more; 1.4 puts the estimate above the measured memory of every configuration it was
# checked against (SmolLM2-135M: LoRA r16 at batches of 2 to 32 rows and 40 to 512 tokens, full tuning at
# batch 8), by at most 1.33x (2-core AMX VM). Small batches measure less per row than larger ones
# (allocator reuse), so they get the widest margin. The measurements, and how they were taken, are in
# docs/benchmarks.md.
CALIBRATION = 1.4

# Attention implementations that materialise the (heads, T, T) scores; SDPA / flash kernels do not.
SCORES_MATERIALISED = {"eager", TUNELAB_ATTENTION}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step: `fixed` whatever the batch, plus `per_example` for each row."""

    weights: int  # bytes: the model's weights as stored (loaded already)
    trainable: int  # parameters that train (LoRA: the adapter's, counted from the config)
    training_state: int  # bytes: gradients, AdamW moments, adapter weights, autocast weight copies
    per_example: int  # bytes: activations of one row of `length` tokens, calibrated
    length: int  # tokens of the longest row (what per_example is for)

    @property
    def fixed(self) -> int:
        return self.weights + self.training_state

    def total(self, batch: int) -> int:
        return self.fixed + batch * self.per_example

    def largest_batch(self, budget: float) -> int:
        """The most rows that fit in `budget` bytes; 0 when not even one does."""
        return max(0, int((budget - self.fixed) // max(self.per_example, 1)))


@dataclass(frozen=True)
class Available:
    bytes: int  # free now, on the device the model is on
    source: str  # where the number comes from, for the run log


def estimate_training_memory(
    model: torch.nn.Module, max_tokens: int, max_trained_tokens: int, *, tuning: str = "lora",
    lora: LoraConfig | None = None, bf16: bool = False, shards: int = 1,
) -> MemoryEstimate:
    """Upper bound of one step's memory on `model` as loaded (before LoRA is attached or weights unfrozen).

    `max_tokens` is the longest row of the data, `max_trained_tokens` the most trained tokens in a row
    (the LM head and its loss run only there). `shards`: processes that split the weights and the training
    state (FSDP): each holds 1/shards of them, plus the whole weights of the layer being computed.
    """
    config = model.config.get_text_config()
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim  # width of k and of v
    vocab = config.vocab_size

    # ---- fixed bytes
    weights = weight_bytes(model)
    if tuning == "full":
        trainable = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
        per_param = 4 + 8 + 4 + (2 if bf16 else 0)  # grad + AdamW moments + step temporary (+ bf16 autocast copy)
        adapted_inputs = 0
    else:
        lora = lora or LoraConfig()
        targets = lora_targets(model, lora.target_modules)
        trainable = sum(lora.rank * (m.in_features + m.out_features) + (m.out_features if lora.use_dora else 0)
                        for m in targets)
        per_param = 4 + 4 + 8 + 4  # fp32 adapter weight + grad + AdamW moments + step temporary
        adapted_inputs = sum(m.in_features for m in targets) + lora.rank * len(targets)  # per token, all layers
    # (foreach AdamW's step makes a parameter-sized temporary, e.g. sqrt of the second moment)
    training_state = trainable * per_param
    if shards > 1:  # FSDP: a share of everything, plus about two layers gathered whole (the current and next)
        weights = min(weights, weights // shards + 2 * weights // max(layers, 1))
        training_state //= shards

    # ---- activations kept for backward, bytes per token (a: bytes of an autocast activation; r: of the
    # residual stream, which has the dtype of the stored embeddings)
    a = 2 if bf16 else 4
    r = model.get_input_embeddings().weight.element_size()
    per_layer = (
        2 * (4 + r) * hidden  # two RMSNorms: the fp32 copy of their input, and the normalised output
        + a * (4 * hidden + 4 * kv)  # q, k, v; RoPE's rotate_half copies and rotated q, k; attention output
        + a * 4 * inter  # MLP: gate, up, silu(gate), silu(gate) * up (the down projection's input)
    )
    if bf16 and tuning == "full":
        per_layer += a * 5 * hidden  # autocast's bf16 copies of the fp32 normed input for q, k, v, gate, up
    per_token = layers * per_layer
    if bf16 and tuning != "full":
        # PEFT casts each adapted layer's input to the adapter's fp32, autocast casts it back: one more copy
        # per adapted layer (and the rank-wide lora_A output)
        per_token += a * adapted_inputs
    # Attention scores, per row: (heads, T, T) softmax probabilities in fp32, plus their bf16 cast
    scores = 0
    if getattr(config, "_attn_implementation", None) in SCORES_MATERIALISED:
        scores = layers * heads * max_tokens**2 * (4 + (a if bf16 else 0))
    mask = 4 * max_tokens**2  # the additive (T, T) float mask of a row, shared by the layers
    # LM head at trained positions only, with the loss in row chunks (train.head_loss): a chunk's logits in
    # the autocast dtype, their fp32 buffer, and the logit gradient cast back. Per row here, so an upper
    # bound: a step never holds more than head_loss.CHUNK_LOGITS logits at once
    head = max_trained_tokens * vocab * (2 * a + 4)
    per_example = CALIBRATION * (max_tokens * per_token + scores + mask + head)
    return MemoryEstimate(weights, trainable, training_state, int(per_example), max_tokens)


def lora_targets(model: torch.nn.Module, target_modules: str | list[str]) -> list[torch.nn.Linear]:
    """The linear layers PEFT adapts for `target_modules`: 'all-linear' (every linear layer but the LM head),
    a list of name suffixes, or a regular expression matched against the full module name."""
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if target_modules == "all-linear":
        return [m for _, m in linears]
    if isinstance(target_modules, str):
        return [m for n, m in linears if re.fullmatch(target_modules, n)]
    return [m for n, m in linears if any(n == key or n.endswith(f".{key}") for key in target_modules)]


def available_memory(device: torch.device | str = "cpu") -> Available | None:
    """Bytes free now where training runs: free CUDA memory on a GPU; on the CPU the smaller of
    MemAvailable and what the cgroup limit (containers) leaves. None where it cannot be told (not Linux).

    Under torchrun the CPU's memory is shared by the processes of a machine (LOCAL_WORLD_SIZE), and every
    process gets the least any of them saw, so that all choose the same batch.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return Available(_least_over_processes(int(free)), f"free on {torch.cuda.get_device_name(device)}")
    found = [(n, source) for n, source in ((_meminfo_available(), "MemAvailable"),
                                           (_cgroup_room(), "the cgroup memory limit")) if n is not None]
    if not found:  # not Linux: no way to tell without a dependency
        return None
    n, source = min(found)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if sharing > 1:
        n, source = n // sharing, f"{source} / {sharing} processes"
    return Available(_least_over_processes(n), source)


def _least_over_processes(n: int) -> int:
    """The smallest `n` of all processes (a collective: every process must call it), or `n` alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    value = torch.tensor([n], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1); None when there is no limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a number near 2**63
            return None
        return max(0, int(limit) - usage)
    return None


def peak_memory_mb() -> float:
    """Peak memory so far: the process's peak RSS on CPU (what the OS charges), allocated bytes on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
