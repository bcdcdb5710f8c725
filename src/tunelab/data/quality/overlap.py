r"""Rows that repeat: exact duplicates, near duplicates, conflicting answers, and leakage between files or splits.

What is compared (all text normalized: case-folded, whitespace collapsed):

    exact duplicate      the whole conversation: every role and content, system included
    near duplicate       the non-system contents, by Jaccard of their words and word pairs (near_dup.py);
                         system prompts are left out because most files repeat one in every
                         row, which would make every row "near" every other
    conflicting answers  the prompt (every message before the last assistant turn, system
                         included: a different system prompt may rightly change the answer)
                         is the same, the answer differs
    leakage              an evaluation row's prompt, system left out, is in the training rows
                         exactly or nearly (whatever the answers: the model has seen the input)

Worked example (rows of one file, by index):

    0 user "Where is my card?"         assistant "card_arrival"
    1 user "where is  my card?"        assistant "card_arrival"    exact duplicate of 0
    2 user "Where is my card?"         assistant "card_linking"    conflicting answers with 0
    exact_duplicates(rows) -> {1: 0};   conflicts(rows) -> {2: 0}

Preference pairs take part in duplicates and leakage (prompt, chosen and rejected
together), not in conflicts: one prompt with several pairs is how preference data looks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tunelab.data.quality.near_dup import DEFAULT_THRESHOLD, Match, earlier_matches, normalize
from tunelab.data.records import Conversation, Message, PreferencePair

Record = Conversation | PreferencePair

_SEP = "\x1f"  # between role and content in a key; normalize() turns every whitespace into " ", never this


@dataclass(frozen=True, slots=True)
class Leak:
    """An evaluation row whose prompt is (nearly) a training row's prompt."""

    index: int  # into the evaluation rows
    source: str  # the evaluation row's "file:line"
    train_index: int  # into the training rows
    train_source: str
    exact: bool  # the same prompt after normalization; else a near match
    similarity: float  # Jaccard of the prompts' shingles; 1.0 for an exact match
    same_answer: bool  # exact matches only: the answers agree too (a plain repeat); False for near matches


def messages_of(record: Record) -> tuple[Message, ...]:
    if isinstance(record, Conversation):
        return record.messages
    return record.prompt + record.chosen + record.rejected


def prompt_of(record: Record) -> tuple[Message, ...]:
    return record.prompt_messages if isinstance(record, Conversation) else record.prompt


def conversation_key(record: Record) -> str:
    """The whole record, normalized: equal keys are exact duplicates."""
    return _key(messages_of(record), system=True)


def prompt_key(record: Record, *, system: bool = True) -> str:
    return _key(prompt_of(record), system=system)


def near_text(messages: Sequence[Message]) -> str:
    """What near-duplicate detection compares: the non-system contents, one per line."""
    return "\n".join(m.content for m in messages if m.role != "system")


def exact_duplicates(records: Sequence[Record]) -> dict[int, int]:
    """index -> index of the first row with the same conversation_key, for every repeat."""
    first: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for i, record in enumerate(records):
        key = conversation_key(record)
        if key in first:
            repeats[i] = first[key]
        else:
            first[key] = i
    return repeats


def near_duplicates(records: Sequence[Record], threshold: float = DEFAULT_THRESHOLD,
                    exact: dict[int, int] | None = None) -> dict[int, Match]:
    """index -> the first earlier row at Jaccard >= threshold, for rows that are not exact duplicates."""
    exact = exact_duplicates(records) if exact is None else exact
    distinct = [i for i in range(len(records)) if i not in exact]
    texts = [near_text(messages_of(records[i])) for i in distinct]
    return {distinct[j]: Match(distinct[m.earlier], m.similarity)
            for j, m in earlier_matches(texts, threshold).items()}


def conflicts(records: Sequence[Record]) -> dict[int, int]:
    """index -> first row with the same prompt, for each conversation whose answer differs from that row's."""
    first: dict[str, tuple[int, str]] = {}
    out: dict[int, int] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Conversation):
            continue
        key, answer = prompt_key(record), normalize(record.answer)
        if key not in first:
            first[key] = (i, answer)
        elif first[key][1] != answer:
            out[i] = first[key][0]
    return out


def leaks(train: Sequence[Record], evaluation: Sequence[Record], threshold: float = DEFAULT_THRESHOLD) -> list[Leak]:
    """Evaluation rows whose prompt (system messages left out) is in `train` exactly or at Jaccard >= threshold.

    Each evaluation row is reported once, against the first training row it matches (an
    exact match before a near one).
    """
    first: dict[str, int] = {}
    for i, record in enumerate(train):
        first.setdefault(prompt_key(record, system=False), i)
    found: dict[int, Leak] = {}
    for j, record in enumerate(evaluation):
        i = first.get(prompt_key(record, system=False))
        if i is not None:
            same = normalize(_answer_text(train[i])) == normalize(_answer_text(record))
            found[j] = Leak(j, record.source, i, train[i].source, True, 1.0, same)
    # Near: distinct training prompts, then the evaluation rows not matched exactly.
    reference = sorted(first.values())
    queries = [j for j in range(len(evaluation)) if j not in found]
    texts = [near_text(prompt_of(train[i])) for i in reference] + [near_text(prompt_of(evaluation[j])) for j in queries]
    for q, m in earlier_matches(texts, threshold, reference=len(reference)).items():
        j, i = queries[q - len(reference)], reference[m.earlier]
        found[j] = Leak(j, evaluation[j].source, i, train[i].source, False, m.similarity, False)
    return [found[j] for j in sorted(found)]


def split_leakage(train: Sequence[Record], validation: Sequence[Record], test: Sequence[Record],
                  threshold: float = DEFAULT_THRESHOLD) -> dict[str, list[Leak]]:
    """Validation and test rows whose prompt is (nearly) in train: {"validation": [...], "test": [...]}.

    For the splits of tunelab/data/split.py: identical rows never cross splits (the split
    is a hash of the row), so what this finds is prompts that differ only in case or
    spacing, repeat with another answer, or are near duplicates.
    """
    return {"validation": leaks(train, validation, threshold), "test": leaks(train, test, threshold)}


def _key(messages: Sequence[Message], *, system: bool) -> str:
    return "\n".join(f"{m.role}{_SEP}{normalize(m.content)}" for m in messages if system or m.role != "system")


def _answer_text(record: Record) -> str:
    return record.answer if isinstance(record, Conversation) else near_text(record.chosen)
