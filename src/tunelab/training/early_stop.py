"""Early stopping on the validation loss, with its state rebuilt from the run's own metrics.

The state (best loss, its step, validations since) is a pure function of the
validation losses logged so far, so a resumed run replays metrics.jsonl instead of
saving it separately:

    val_loss at steps 50, 100, 150, 200 = 0.36, 0.13, 0.14, 0.15, patience 2
    -> best 0.13 at step 100; 2 validations without improvement -> stop after step 200
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EarlyStopping:
    patience: int  # 0 = never stop early (the best step is still tracked)
    min_delta: float
    best: float | None = None
    best_step: int | None = None
    bad: int = 0  # validations since the best

    def update(self, step: int, val_loss: float) -> bool:
        """Take one validation; True when it is a new best."""
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = val_loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    @classmethod
    def replay(cls, patience: int, min_delta: float, metrics: Path, up_to_step: int) -> "EarlyStopping":
        state = cls(patience, min_delta)
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if "loss" in record and "val_loss" in record and record["step"] <= up_to_step:
                    state.update(record["step"], record["val_loss"])
        return state
