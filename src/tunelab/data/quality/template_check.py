r"""Checks under a model's chat template: does each answer survive tokenization, and how long are the rows?

Round trip, per assistant turn that is trained (weight 1): tokenize the conversation the
way training does (tunelab/data/tokenize.py: labels on the assistant span), decode each
run of trained tokens, and compare it with the characters of that span, which are the
answer followed by the end-of-turn token:

    ChatML, "card_arrival":  trained tokens decode to "card_arrival<|im_end|>"      ok
    a tokenizer that merges "\nc" across the header/answer boundary:
                             trained tokens decode to "ard_arrival<|im_end|>"       template_roundtrip
    a template that trims the answer ("  card_arrival " is rendered "card_arrival"),
    or never writes the end-of-turn token: the span cannot be found                 template_roundtrip

Lengths: each row rendered whole, in tokens (a preference pair: its longer side);
min / median / p95 / max over the file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tunelab.data.findings import Finding
from tunelab.data.quality.pii import masked_excerpt
from tunelab.data.records import Conversation, PreferencePair
from tunelab.data.tokenize import IGNORE_INDEX, assistant_char_spans, end_of_turn_token, render, tokenize_conversations
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Record = Conversation | PreferencePair
ROUNDTRIP_FIX = ("use a model whose chat template writes each answer unchanged and closes it with the tokenizer's "
                 "eos_token, or edit the rows (leading/trailing spaces are what templates most often strip)")


def check_template(tokenizer: PreTrainedTokenizerBase,
                   rows: Sequence[tuple[int, Record]]) -> tuple[list[Finding], dict[str, int] | None]:
    """(template_error and template_roundtrip findings, length statistics or None when nothing rendered)."""
    from jinja2 import TemplateError

    eot = end_of_turn_token(tokenizer)  # raises TunelabError (a usage error) when there is none
    findings: list[Finding] = []
    texts: list[str] = []
    owners: list[int] = []  # index into `rows` of each rendered text
    sides: list[tuple[int, str, Conversation]] = []  # (row index, "" / "chosen " / "rejected ", conversation)
    for r, (line, record) in enumerate(rows):
        convs = [("", record)] if isinstance(record, Conversation) else [
            ("chosen ", record.chosen_conversation), ("rejected ", record.rejected_conversation)]
        try:
            rendered = [render(tokenizer, c.as_dicts(), add_generation_prompt=False) for _, c in convs]
        except TemplateError as exc:
            findings.append(Finding("template_error", line, "", f"the chat template refuses this conversation: {exc}",
                                    "reorder or merge the messages the way the model's template expects"))
            continue
        texts += rendered
        owners += [r] * len(rendered)
        sides += [(r, side, c) for side, c in convs]
    lengths: dict[int, int] = {}
    if texts:
        for r, ids in zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            lengths[r] = max(lengths.get(r, 0), len(ids))
    for r, side, kind, problem in _roundtrip_problems(tokenizer, sides, eot):
        fix = ROUNDTRIP_FIX if kind == "template_roundtrip" else "reorder or merge the messages the way the model's template expects"
        findings.append(Finding(kind, rows[r][0], "", side + problem, fix))
    findings.sort(key=lambda f: f.line or 0)
    return findings, _stats(list(lengths.values())) if lengths else None


def _roundtrip_problems(tokenizer: PreTrainedTokenizerBase, sides: list[tuple[int, str, Conversation]],
                        eot: str) -> list[tuple[int, str, str, str]]:
    """(row index, side, kind, what went wrong) per conversation whose trained tokens are not its answers + eot."""
    from jinja2 import TemplateError

    convs = [c for _, _, c in sides]
    try:
        examples = tokenize_conversations(tokenizer, convs, max_length=sys.maxsize)[0]
    except (TunelabError, TemplateError):  # some row cannot be tokenized: find which, one at a time
        examples = None
    problems = []
    for k, (r, side, conv) in enumerate(sides):
        try:
            full, spans = assistant_char_spans(tokenizer, conv)
            example = examples[k] if examples is not None else tokenize_conversations(tokenizer, [conv], sys.maxsize)[0][0]
        except TunelabError as exc:  # the answer or the end-of-turn token is not where the template should put it
            problems.append((r, side, "template_roundtrip", exc.what))
            continue
        except TemplateError as exc:  # the whole conversation renders, but a prefix of it (up to a turn) does not
            problems.append((r, side, "template_error", f"the chat template refuses a prefix of this conversation: {exc}"))
            continue
        runs = _trained_runs(example.labels)
        for turn, (start, end) in enumerate(spans, start=1):
            want = full[start:end]
            got = (tokenizer.decode(example.input_ids[runs[turn - 1][0]: runs[turn - 1][1]], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False) if turn <= len(runs) else "")
            if got == want:
                continue
            if not got.endswith(eot):
                what = f"the end-of-turn token {eot!r} is not trained"
            else:
                what = "the answer does not survive tokenization"
            problems.append((r, side, "template_roundtrip", f"assistant turn {turn}: {what}: the trained tokens decode to "
                                                            f"{masked_excerpt(got)!r}, the turn is {masked_excerpt(want)!r}"))
            break
    return problems


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive trained positions."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _stats(values: list[int]) -> dict[str, int]:
    """min / median / p95 / max (nearest rank: values that occur)."""
    s = sorted(values)

    def rank(q: float) -> int:
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {"rows": len(s), "min": s[0], "median": rank(0.5), "p95": rank(0.95), "max": s[-1]}
