"""The data report: what reading, splitting and tokenizing did to a run's data (data.json holds it).

Types only (pydantic, no torch), so the registry and the report read it without loading a model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenStats(_Report):
    mean: float
    min: int
    max: int


class Dropped(_Report):
    count: int
    first: list[str]  # sources (file:line) of the first few


class DataReport(_Report):
    """What the data half of a run did (data.json). For DPO an "example" is a pair: both of its rows."""

    path: str  # the data file, or "records" when passed in memory
    sha256: str  # of the file's bytes (in memory: of the records as JSONL)
    objective: Literal["sft", "dpo"]
    rows: int
    splits: dict[str, int]  # train / validation / test rows
    stratified: bool  # split by label (classification-like data)
    labels: int | None  # distinct answers, when stratified
    train_rows_used: int
    dropped_too_long: Dropped
    validation_rows_used: int
    tokens_per_example: TokenStats
    trained_tokens_per_example: TokenStats
    train_tokens: int
    train_trained_tokens: int
