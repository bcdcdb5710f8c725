"""eval.json as types: what an evaluation writes and what the report, the registry's gate and the CLI read.

    result = EvalResult.read(run_dir / "eval.json")     # parsed once, at the edge: a TunelabError if malformed
    result.contenders["finetune"].metrics["accuracy"]    # typed from here on, no .get() guards
    result.write(run_dir / "eval.json")                  # atomically

docs/eval-format.md describes the same fields for people; `tests/evaluation/test_result.py` checks
that every field here is named there and that the example in it parses.

Format history: `tunelab-eval/2` dropped the flat `summary` that `/1` carried beside the
contenders (the run's summary lives in the manifest now) and added the `preference` task
(DPO runs). A `/1` file is refused with the command that rewrites it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import TunelabError, first_problem
from tunelab.io import write_json_atomic

FORMAT = "tunelab-eval/2"
Task = Literal["classification", "structured", "free_text", "preference"]
Interval = tuple[float, float]  # a 95% interval [low, high]
# The contenders, as reports and tables name them (evaluation/contenders.py says what each is).
DISPLAY_NAMES = {"finetune": "fine-tune", "base_zero_shot": "base zero-shot", "base_few_shot": "base few-shot"}


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Confusion(_Record):
    """Classification only: rows are the references, columns the predictions, in `labels` order."""

    labels: list[str]
    matrix: list[list[int]]


class Sampling(_Record):
    temperature: float = Field(description="0: greedy")
    top_p: float
    seed: int


class Contender(_Record):
    """One model (and prompt) answering every test row."""

    metrics: dict[str, float | None] = Field(description="task metrics, plus loss and perplexity on the references")
    ci: dict[str, Interval] = Field(description="95% bootstrap interval of each per-row metric")
    prompt_tokens_mean: float
    shared_prefix_tokens: int = Field(0, description="prompt tokens every row shared, computed once")
    seconds: float = Field(description="generation (or scoring) time of all rows")
    loss_seconds: float = 0.0
    ms_per_request: float
    never_stopped: int = Field(0, description="rows that hit max_new_tokens without an end-of-turn")
    sampling: Sampling | None = None
    predictions: list[str] = Field(description="one per test row, in row order")
    correct: list[bool] = Field(description="per row: right or wrong under the task metric")
    scores: list[float] = Field(description="per row score of the primary metric (the paired bootstrap's input)")
    confusion: Confusion | None = None
    reused: bool = Field(False, description="read back from an earlier evaluation on this machine with the same base, "
                         "prompts and settings (a base contender; evaluation/base_results.py)")


class Example(_Record):
    """A row the fine-tune won or lost against a baseline, quoted."""

    source: str
    prompt: str
    reference: str
    finetune: str
    baseline: str


class Comparison(_Record):
    """The fine-tune against one baseline on the same rows."""

    metric: str
    finetune: float
    baseline: float
    delta: float
    delta_ci: Interval = Field(description="paired bootstrap 95% interval of the difference")
    test: Literal["mcnemar", "paired_bootstrap"]
    p_value: float
    significant: bool = Field(description="p < alpha (0.05) and delta > 0")
    wins: int = Field(description="rows the fine-tune got right and the baseline wrong")
    losses: int = Field(description="rows the baseline got right and the fine-tune wrong")
    win_examples: list[Example] = Field(default_factory=list, description="at most 10")
    loss_examples: list[Example] = Field(default_factory=list, description="at most 10")


class Shift(_Record):
    base: float
    finetune: float
    delta: float


class CategoryShift(Shift):
    items: int


class ProbeItemResult(_Record):
    id: str
    category: str
    base_ok: bool
    finetune_ok: bool


class Forgetting(_Record):
    """General ability with and without the fine-tune: a shipped probe and a general-text loss."""

    probe_items: int
    probe: Shift = Field(description="probe score: fraction of items answered right")
    general_text_loss: Shift = Field(description="mean loss per token, lower is better")
    general_text_tokens: int
    threshold: float
    loss_tolerance: float
    flagged: bool
    why: str
    categories: dict[str, CategoryShift] = Field(default_factory=dict)
    items: list[ProbeItemResult] = Field(default_factory=list)
    base_reused: bool = Field(False, description="the base's probe answers and text loss read back from an earlier "
                              "evaluation on this machine (evaluation/base_results.py)")


class FewShot(_Record):
    k: int
    sources: list[str] = Field(description="file:line of the training rows shown")


class Generation(_Record):
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: str


class EvalResult(_Record):
    """One evaluation: every contender on the same rows, the comparisons, the forgetting check."""

    format: Literal["tunelab-eval/2"] = FORMAT
    task: Task | None = Field(description="None when there were no test rows")
    metric: str | None = Field(description="the primary metric: what the gate, the plots and the summary use")
    metric_why: str | None = None
    test_rows: int
    labels: int | None = Field(None, description="classification: the size of the label set")
    data: str | None = Field(None, description="what was evaluated: a file, or the run's own test split")
    few_shot: FewShot | None = None
    generation: Generation | None = None
    contenders: dict[str, Contender] = Field(default_factory=dict)
    comparisons: dict[str, Comparison] = Field(default_factory=dict)
    forgetting: Forgetting | None = Field(None, description="absent when eval.forgetting_probe is false")

    def primary(self, contender: str) -> tuple[float | None, Interval | None]:
        """(value, 95% interval) of the primary metric for one contender; (None, None) when it did not run."""
        c = self.contenders.get(contender)
        if c is None or self.metric is None:
            return None, None
        return c.metrics.get(self.metric), c.ci.get(self.metric)

    @classmethod
    def read(cls, path: Path) -> EvalResult:
        """Parse an eval.json; anything else (another format, a broken file) is a TunelabError saying how to redo it."""
        path = Path(path)
        fix = f"evaluate again: tunelab eval {path.parent}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TunelabError(f"cannot read the evaluation: {exc.strerror}", where=str(path), fix=fix) from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise TunelabError(f"not a {FORMAT} evaluation: {first_problem(exc)}", where=str(path), fix=fix) from None

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))
