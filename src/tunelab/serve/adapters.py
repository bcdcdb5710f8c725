"""Adapters to serve: checked once when first named, then held in reference-counted slots.

`check_adapter` refuses, with the reason, what the engine could not serve correctly; each is a
bug users of other servers met as a wrong answer with no error:

    DoRA                 its weight norm is not a plain low-rank sum (serve it after `tunelab export`)
    modules_to_save      whole replaced layers (an embedding, a head) that a slot cannot hold
    rank > max_lora_rank slots are allocated at the largest rank served
    no matching target   an adapter whose tensors name no layer of the base would change nothing
                         (vLLM #34186)
    another base         the adapter was trained on other weights (fingerprint in the run's data.json)
    a changed template   the template canary (model/template_canary.py) runs on the run's tokenizer
    full fine-tunes      a whole model, not an adapter: serve it as a base model of its own

`SlotTable` maps an adapter (one registry version or run directory: `AdapterRef.key`) to a slot of
every `MultiLoraLinear`. A slot in use by a running request is never evicted or rewritten; a new
version of a name is a new key, so it loads into a new slot (copy-on-replace) while requests on
the old one finish. Idle slots are evicted least recently used first.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tunelab.errors import TunelabError
from tunelab.rundir import finished
from tunelab.serve.multi_lora import MultiLoraLinear

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix before the base model's own module names


@dataclass(frozen=True)
class AdapterRef:
    key: str  # identity of the weights: the resolved run or registry-version folder
    run_dir: Path


class SlotsBusy(Exception):
    """Every slot holds an adapter that a running request uses; the request waits for one to free."""


def check_adapter(run_dir: Path, base_fingerprint: str, max_rank: int, where: str) -> dict:
    """The run's adapter_config.json, or a TunelabError naming why this adapter cannot be served."""
    run = finished(run_dir)
    if (run.path / "model").is_dir():
        raise TunelabError("this run fine-tuned the whole model: there is no adapter to serve on the base", where=where,
                           fix="serve adapters (tuning: lora); a fully tuned model is served as a base of its own")
    config_file = run.path / "adapter" / "adapter_config.json"
    if not config_file.is_file():
        raise TunelabError(f"no adapter at {config_file}", where=where, fix="pass a finished LoRA run directory")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise TunelabError(f"adapter type {config.get('peft_type')} is not LoRA", where=where,
                           fix="serve LoRA adapters (the engine's slots hold low-rank weights)")
    if config.get("use_dora"):
        raise TunelabError("DoRA adapters are not served by the multi-adapter engine (their weight norm is not a "
                           "low-rank sum)", where=where, fix="train with lora.use_dora: false to serve it here")
    if config.get("modules_to_save"):
        raise TunelabError(f"the adapter replaces whole modules ({', '.join(config['modules_to_save'])}), which a "
                           "LoRA slot cannot hold", where=where, fix="train without modules_to_save")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise TunelabError("per-module ranks or alphas (rank_pattern, alpha_pattern) are not served", where=where,
                           fix="train with one rank and alpha for every module")
    if int(config["r"]) > max_rank:
        raise TunelabError(f"LoRA rank {config['r']} is above the server's maximum {max_rank}", where=where,
                           fix=f"start the server with --max-lora-rank {config['r']} (every slot takes that rank)")
    trained_on = run.data().base_model.weights
    if trained_on != base_fingerprint:
        raise TunelabError(f"the adapter was trained on other base weights (fingerprint {trained_on}, served base "
                           f"{base_fingerprint})", where=where,
                           fix=f"serve it on the base it was trained on ({run.data().base_model.spec})")
    return config


def read_lora(run_dir: Path, layers: dict[str, MultiLoraLinear], config: dict, where: str
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A (r, in), B (out, r) times the LoRA scale), for every layer the adapter targets."""
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
            module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if module not in layers or part not in ("A.weight", "B.weight"):
                unknown.append(key)
                continue
            found.setdefault(module, {})[part[0]] = tensors.get_tensor(key)
    if unknown:
        raise TunelabError(f"{len(unknown)} adapter tensors match no linear layer of the served base (first: "
                           f"{unknown[0]})", where=where,
                           fix="serve adapters trained by tunelab on this base (LoRA on its linear layers)")
    if not found:
        raise TunelabError("the adapter holds no LoRA weights: it would change nothing", where=where,
                           fix="check target_modules in the run's lora config, and retrain")
    return {m: (ab["A"], ab["B"] * scale) for m, ab in found.items()}


class SlotTable:
    """Adapter slots 1..capacity of every wrapped layer (slot 0 is the base: always zeros)."""

    def __init__(self, layers: dict[str, MultiLoraLinear], capacity: int, configs: dict[str, dict]) -> None:
        self.layers = layers
        self.capacity = capacity
        self.keys: list[str | None] = [None] * (capacity + 1)
        self.refs = [0] * (capacity + 1)
        self.last_used = [0.0] * (capacity + 1)
        self.loads = 0  # adapters read from disk, for /metrics
        self.configs = configs  # key -> adapter_config.json, once checked (serve/catalog.py)

    def loaded(self) -> int:
        return sum(k is not None for k in self.keys[1:])

    def acquire(self, ref: AdapterRef | None) -> int:
        """The slot holding `ref` (loading it if needed), with one more reference; 0 for the base model."""
        if ref is None:
            return 0
        if ref.key in self.keys:
            slot = self.keys.index(ref.key)
        else:
            slot = self._free_slot()
            weights = read_lora(ref.run_dir, self.layers, self.configs[ref.key], where=ref.key)
            for name, layer in self.layers.items():
                a, b = weights.get(name, (None, None))
                layer.write_slot(slot, a, b)
            self.keys[slot] = ref.key
            self.loads += 1
        self.refs[slot] += 1
        self.last_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        if slot:
            assert self.refs[slot] > 0, f"slot {slot} released more often than acquired"
            self.refs[slot] -= 1

    def _free_slot(self) -> int:
        empty = [s for s in range(1, self.capacity + 1) if self.keys[s] is None]
        if empty:
            return empty[0]
        idle = [s for s in range(1, self.capacity + 1) if self.refs[s] == 0]
        if not idle:
            raise SlotsBusy
        slot = min(idle, key=lambda s: self.last_used[s])  # least recently used
        self.keys[slot] = None
        return slot
