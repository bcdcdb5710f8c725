"""Training objectives: SFT and DPO, each one implementation of `base.Objective`; `objective_for` chooses."""

from __future__ import annotations

from tunelab.config import RunConfig
from tunelab.training.objectives.base import Objective
from tunelab.training.objectives.dpo import Dpo
from tunelab.training.objectives.sft import Sft


def objective_for(cfg: RunConfig, shard: bool = False) -> Objective:
    """The run's objective. `shard` (FSDP): no shared-prefix pass, since its decoder layers would run twice
    per step and the prefix's output lives only in the KV cache, where FSDP's pre-backward hook never sees
    it (backward would find the layer's gathered weights already freed)."""
    fast = cfg.model.kernels == "tunelab"
    if cfg.objective == "dpo":
        return Dpo(beta=cfg.dpo.beta, share_prefix=fast)
    return Sft(packing=cfg.train.packing, pack_length=cfg.train.pack_length, fast=fast, sharded=shard)


__all__ = ["Dpo", "Objective", "Sft", "objective_for"]
