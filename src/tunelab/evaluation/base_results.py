"""The base model's half of an evaluation, kept between runs on this machine: it does not depend on the fine-tune.

Every run on a data set evaluates the base zero-shot and few-shot on the same held-out rows, and every
run on any data set takes the base through the forgetting probe. What the base answers is a function of
its weights, the prompts and the settings, so a later run on this machine reads those results back
instead of computing them again (what it saves per CPU class: docs/benchmarks.md). eval.json says which
results were read back (`reused`, `base_reused`); `eval.reuse_base: false` computes everything afresh.

    reuse = BaseResults(base=f"{weights_fingerprint(resolved)} {cfg.model.kernels}", precision=precision)
    key = reuse.key("contender", tokenizer, name="base_zero_shot", prompts=ids, ...)
    stored = reuse.get(key)          # a dict, or None (never stored, or unreadable)
    reuse.put(key, contender.model_dump(mode="json"))

A key is the sha256 of everything a result depends on:

    the base         the caller's `base` (weights fingerprint and kernels setting), the chat template
    the arithmetic   bf16 or fp32, this machine (CPU model, extensions, torch's version and dispatch
                     level, oneDNN's ISA limit) and torch's thread count: the same answers come back only
                     from the same sums
    the code         a hash of tunelab's own source files, so a change to how tunelab generates or
                     scores misses every stored result rather than serving an old answer
    the question     what the caller passes: prompts, references, labels, generation settings

Results are JSON files in $TUNELAB_HOME/base-results/, written to a temporary name and renamed; a file
that does not parse is a miss. Nothing is unpickled: a stored result is data validated on the way in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.io import tunelab_home, write_json_atomic
from tunelab.model.precision import Precision, detect_hardware
from tunelab.model.template_canary import template_fingerprint

log = logging.getLogger(__name__)

FOLDER = "base-results"


@functools.cache
def source_hash() -> str:
    """sha256 over the path and bytes of every .py file of the tunelab package (a few hundred KB: milliseconds)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseResults:
    """Stored base-model results under `root`, for one base (`base`: the caller's identity of its weights)."""

    base: str
    precision: Precision
    root: Path = field(default_factory=lambda: tunelab_home() / FOLDER)

    def key(self, kind: str, tokenizer: PreTrainedTokenizerBase, **question: Any) -> str:
        """The sha256 naming a result of `kind` for `question` (JSON-able values) on this base and machine."""
        parts = {
            "kind": kind, "base": self.base, "template": template_fingerprint(tokenizer),
            "bf16": self.precision.bf16, "weights_dtype": str(self.precision.weights_dtype),
            "machine": detect_hardware().identity(), "threads": torch.get_num_threads(), "code": source_hash(),
            "question": question,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # half a file from a crash elsewhere, a disk error: compute again
            log.warning("base results %s unreadable (%s): computing them again", path, e)
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        """Store `value` (JSON-able); a store that fails (read-only home, full disk) only warns: it is a cache."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.root / f"{key}.json", value)
        except OSError as e:
            log.warning("could not keep base results in %s (%s): the next run computes them again", self.root, e)
