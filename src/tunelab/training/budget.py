"""Say early when a run will not fit its time budget, with the estimate and a smaller run that would.

`train.time_budget_minutes` is what the user (or the demo) allows for setup and training. The run's own
first steps are the probe: after one untimed warm-up step (first calls allocate and build kernels) and
`PROBE_STEPS` timed ones, seconds per input token times the tokens still to train, plus the time
already spent, is the estimate. It costs two validation batches (below) and no separate probe like
`tunelab plan`'s (the steps are the run's own), and it comes seconds into a run that may take many
minutes; the run log then says how long, why (the measured tokens/s and precision) and what fits:
`data.max_train_rows` scaled to the budget. The run goes on (Ctrl-C stops it at a checkpoint;
`--resume` continues it).

Validations count too: none has run yet at step 4, so at the estimate one validation batch is timed
(after an untimed one, which builds the no-gradient graph the first validation would build anyway) and
scaled to the batches of a validation and the validations of the run (`time_validations`, which
`tunelab plan` uses too). A run of several processes leaves them out (a validation is a collective
step of all of them, and only the main process estimates); the message says which.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.training.setup import Setup

PROBE_STEPS = 3  # timed steps after the warm-up step before the estimate


@dataclass
class BudgetCheck:
    budget_seconds: float
    setup_seconds: float
    tokens_to_train: int
    train_rows: int  # examples in one pass over the training data
    precision: str  # "bf16" or "fp32", for the message (the run log's precision line says why)
    validations: Callable[[], float] | None = None  # seconds of the run's validations, timed when asked; None: left out
    _seen: int = 0
    _timed_seconds: float = 0.0
    _timed_tokens: int = 0
    _spent: float = 0.0
    _tokens_done: int = 0
    said: str | None = field(default=None)

    def observe(self, step_seconds: float, step_tokens: int) -> str | None:
        """Feed each step's seconds and input tokens; returns the warning once, at the estimate, if over budget."""
        self._seen += 1
        self._spent += step_seconds
        self._tokens_done += step_tokens
        if self._seen > 1:
            self._timed_seconds += step_seconds
            self._timed_tokens += step_tokens
        if self._seen != PROBE_STEPS + 1 or not self._timed_tokens:
            return None
        per_token = self._timed_seconds / self._timed_tokens
        validating = self.validations() if self.validations is not None else 0.0
        # The validations come with the steps (one every eval_every), so they scale with the rows like training.
        train = self._spent + max(self.tokens_to_train - self._tokens_done, 0) * per_token + validating
        estimate = self.setup_seconds + train
        if estimate <= self.budget_seconds:
            return None
        room = max(self.budget_seconds - self.setup_seconds, 0.0)
        # Rows scale the tokens, so the training time, in proportion; to a round hundred below.
        fits = int(self.train_rows * min(room / train, 1.0) / 100) * 100 if train else 0
        advice = (f"`--set data.max_train_rows={fits}` fits ({fits:,} of {self.train_rows:,} rows: faster, and "
                  "less accurate)" if fits >= 100 else "no smaller run of this data fits; raise the budget")
        validated = (f"validations ~{validating / 60:.1f} min of it" if self.validations is not None
                     else "validations left out: several processes")
        self.said = (
            f"time budget: setup and training will take ~{estimate / 60:.1f} min on this machine ({validated}), "
            f"over train.time_budget_minutes {self.budget_seconds / 60:g} ({1 / per_token:,.0f} tokens/s over "
            f"steps 2-{PROBE_STEPS + 1} in {self.precision}; {self.tokens_to_train:,} tokens to train). {advice}. "
            "Going on; Ctrl-C stops at a checkpoint, and `tunelab train --resume RUN_DIR` continues."
        )
        return self.said


def budget_check(budget_minutes: float | None, setup_seconds: float, tokens_to_train: int, train_rows: int,
                 precision: str, validations: Callable[[], float] | None = None) -> BudgetCheck | None:
    """A check for a run with a budget (None: no budget set, nothing to check)."""
    if budget_minutes is None or not math.isfinite(budget_minutes):
        return None
    return BudgetCheck(budget_minutes * 60, setup_seconds, tokens_to_train, train_rows, precision, validations)


def time_validations(s: Setup) -> float:
    """Seconds of all the run's validations: one every eval_every steps before the last, and the final one."""
    t = s.cfg.train
    return time_validation_pass(s) * ((s.steps - 1) // t.eval_every + 1 if t.eval_every else 1)


def time_validation_pass(s: Setup) -> float:
    """Seconds of one pass over the validation rows: one batch timed (after an untimed one: a forward without
    gradients builds its own graph), times the batches."""
    if not s.val_batches:
        return 0.0
    one = s.val_batches[:1]
    s.objective.validation_sums(s.model, one, s.precision)  # untimed
    started = time.perf_counter()
    s.objective.validation_sums(s.model, one, s.precision)
    return (time.perf_counter() - started) * len(s.val_batches)
