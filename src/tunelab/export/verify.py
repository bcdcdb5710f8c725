"""The verification figures of an export: each compares what was written with the fp32 model it came from.

    ref = outputs(unmerged, prompts, new_tokens=32)            # greedy continuations + logits on prompt+continuation
    merged_out = outputs(merged, prompts, 32, ref.sequences)   # the same token sequences, so logits line up
    check = compare("merge", ref, merged_out, max_diff=1e-4, greedy=True)

Every figure is over the same token sequences: each prompt followed by the reference's own greedy
continuation (teacher forcing), so "max |logit difference|" and "top-1 agreement" compare like with like
even where greedy decoding would diverge. Greedy agreement is whole continuations that match exactly.
The GGUF checks read the written file back: through transformers' GGUF loader (`gguf_file=`, which
dequantizes and undoes the q/k permutation independently of tunelab's writer) and through `gguf.GGUFReader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.export.record import Check

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


@dataclass
class Outputs:
    sequences: list[torch.Tensor]  # prompt + continuation token ids, what the logits are computed on
    greedy: list[list[int]]  # each prompt's greedy continuation
    logits: list[torch.Tensor]  # (T, vocab) per sequence, fp32


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, eos: int | None) -> list[int]:
    """`new_tokens` argmax tokens after `prompt` (stopping after eos), with the KV cache: the same loop for every
    model compared, so no generation setting of one of them can make a difference."""
    out = model(input_ids=prompt[None], use_cache=True)
    tokens: list[int] = []
    for _ in range(new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == eos or len(tokens) == new_tokens:
            break
        out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens


@torch.no_grad()
def outputs(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int, eos: int | None,
            sequences: list[torch.Tensor] | None = None) -> Outputs:
    """Greedy continuations of `prompts`, and logits over `sequences` (default: prompt + own continuation)."""
    continuations = [greedy(model, p, new_tokens, eos) for p in prompts]
    if sequences is None:
        sequences = [torch.cat([p, torch.tensor(c, dtype=torch.long)]) for p, c in zip(prompts, continuations)]
    logits = [model(input_ids=s[None]).logits[0].float() for s in sequences]
    return Outputs(sequences, continuations, logits)


def figures(ref: Outputs, other: Outputs) -> dict[str, Any]:
    diffs = [(a - b).abs().max().item() for a, b in zip(ref.logits, other.logits)]
    top1 = [(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref.logits, other.logits)]
    same = sum(a == b for a, b in zip(ref.greedy, other.greedy))
    scale = max(a.abs().max().item() for a in ref.logits)
    return {"max_abs_logit_diff": float(f"{max(diffs):.3g}"), "max_abs_logit": float(f"{scale:.3g}"),
            "top1_agreement": round(torch.cat(top1).mean().item(), 4),
            "greedy_identical": f"{same}/{len(ref.greedy)}",
            "greedy_agreement": round(same / len(ref.greedy), 4),
            "prompts": len(ref.greedy), "positions": int(sum(len(s) for s in ref.sequences))}


def compare(name: str, ref: Outputs, other: Outputs, max_diff: float | None = None, *, greedy_equal: bool = False,
            min_top1: float | None = None, relative: float | None = None, what: str = "") -> Check:
    """A Check whose limits are: max |logit diff| <= max_diff (or `relative` x the largest |logit|, if larger),
    identical greedy continuations, top-1 >= min_top1."""
    f = figures(ref, other)
    passed, limits = True, []
    if max_diff is not None:
        if relative is not None:
            max_diff = float(f"{max(max_diff, relative * f['max_abs_logit']):.3g}")
        passed &= f["max_abs_logit_diff"] <= max_diff
        f["limit"] = max_diff
        limits.append(f"max |logit diff| <= {max_diff:g}")
    if greedy_equal:
        passed &= f["greedy_agreement"] == 1.0
        limits.append("identical greedy continuations")
    if min_top1 is not None:
        passed &= f["top1_agreement"] >= min_top1
        f["min_top1"] = min_top1
        limits.append(f"top-1 agreement >= {min_top1:.0%}")
    return Check(name=name, passed=bool(passed), figures=f, detail=f"{what}; limits: {', '.join(limits) or 'none'}")


def non_vacuity(base: Outputs, merged: Outputs, min_diff: float, what: str) -> Check:
    """The export must differ from the base: else the merge (or the adapter) returned the base."""
    f = figures(base, merged)
    passed = f["max_abs_logit_diff"] >= min_diff or f["greedy_agreement"] < 1.0
    return Check(name="non-vacuity", passed=passed, figures={**f, "min_diff": min_diff},
                 detail=f"{what} against the base model: it must differ (max |logit diff| >= {min_diff:g} "
                        "or a different greedy continuation)")


def load_gguf_model(path: Path) -> PreTrainedModel:
    """A GGUF read back by transformers' own loader (dequantized to fp32, q/k permutation undone)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def gguf_metadata(path: Path, expected: dict[str, Any]) -> Check:
    """Keys of the written GGUF, read by GGUFReader, against what they must be."""
    import gguf

    from tunelab.export.gguf_meta import read_field

    reader = gguf.GGUFReader(path)
    found = {key: read_field(reader, key) for key in expected}
    wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    shown = {k: (v if not isinstance(v, str) or len(v) < 60 else f"{len(v)} chars") for k, v in found.items()}
    return Check(name="gguf-metadata", passed=not wrong, figures=shown,
                 detail="GGUFReader: " + ("every key as expected" if not wrong else "differs: " + "; ".join(
                     f"{k} = {str(got)[:60]!r}, expected {str(want)[:60]!r}" for k, (got, want) in wrong.items())))


def adapter_delta(path: Path, model: PeftModel, alpha: float, tolerance: float) -> Check:
    """(alpha / r) B A from the adapter GGUF, q/k permutation undone, against PEFT's delta weight per module."""
    import gguf

    from tunelab.export.adapter_gguf import lora_pairs
    from tunelab.export.gguf_names import gguf_name, name_map, qk_heads, unpermute_qk

    config = model.get_base_model().config
    n_blocks, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    names = name_map(n_blocks)
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
               for t in gguf.GGUFReader(path).tensors}
    modules = dict(model.named_modules())
    worst, worst_module, largest = 0.0, "", 0.0
    for module, _ in lora_pairs(model).items():
        base = gguf_name(f"{module}.weight", n_blocks, names)
        a, b = tensors[f"{base}.lora_a"], tensors[f"{base}.lora_b"]
        heads = qk_heads(module, n_head, n_kv)
        b = unpermute_qk(b, heads) if heads else b
        delta = (alpha / b.shape[1]) * (b @ a)
        peft_delta = modules[f"base_model.model.{module}"].get_delta_weight("default").float()
        error = ((delta - peft_delta).abs().max() / peft_delta.abs().max().clamp(min=1e-30)).item()
        largest = max(largest, peft_delta.abs().max().item())
        if error >= worst:
            worst, worst_module = error, module
    return Check(name="adapter-delta", passed=worst <= tolerance and largest > 0,
                 figures={"modules": len(lora_pairs(model)), "max_rel_diff": float(f"{worst:.3g}"),
                          "worst_module": worst_module, "largest_delta": float(f"{largest:.3g}"), "limit": tolerance},
                 detail="(alpha/r) B A read back from the GGUF vs PEFT's get_delta_weight, per module, relative to "
                        "its largest entry; the delta must not be zero")
