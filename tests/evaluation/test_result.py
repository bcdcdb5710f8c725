"""tunelab.evaluation.result: eval.json as types, and docs/eval-format.md kept true to them."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import BaseModel

from helpers import REPO
from tunelab.errors import TunelabError
from tunelab.evaluation import result
from tunelab.evaluation.result import EvalResult

DOC = (REPO / "docs" / "eval-format.md").read_text(encoding="utf-8")


def _fields(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name of a model and of the models its fields hold."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for inner in re.findall(r"tunelab\.evaluation\.result\.(\w+)", str(field.annotation)):
            names |= _fields(getattr(result, inner), seen)
    return names


def test_every_field_is_documented():
    missing = sorted(name for name in _fields(EvalResult) if f"`{name}`" not in DOC and f'"{name}"' not in DOC)
    assert missing == []


def test_the_documented_example_parses():
    (example,) = re.findall(r"```json\n(.*?)```", DOC, re.S)
    parsed = EvalResult.model_validate(json.loads(example))
    assert parsed.primary("finetune") == (0.862, (0.829, 0.889))
    assert parsed.comparisons["base_zero_shot"].significant


def test_a_file_of_another_format_is_refused_with_the_command_that_rewrites_it(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"format": "tunelab-eval/1", "task": "classification", "metric": "accuracy",
                                "test_rows": 3, "summary": {"accuracy": 0.5}}))
    with pytest.raises(TunelabError, match=r"format: Input should be 'tunelab-eval/2'.*tunelab eval"):
        EvalResult.read(path)
    path.write_text("{not json")
    with pytest.raises(TunelabError, match="tunelab-eval/2"):
        EvalResult.read(path)
    with pytest.raises(TunelabError, match="cannot read"):
        EvalResult.read(tmp_path / "missing.json")


def test_write_and_read_round_trip(tmp_path):
    (example,) = re.findall(r"```json\n(.*?)```", DOC, re.S)
    original = EvalResult.model_validate(json.loads(example))
    original.write(tmp_path / "eval.json")
    assert EvalResult.read(tmp_path / "eval.json") == original
    assert EvalResult(task=None, metric=None, test_rows=0).primary("finetune") == (None, None)
