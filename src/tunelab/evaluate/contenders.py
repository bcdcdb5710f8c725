"""The three contenders' prompts, built from the SAME test rows.

    finetune        the row's own prompt (what the fine-tune was trained on), adapter on
    base_zero_shot  the same prompt, adapter off: the base model as the dataset asks it
    base_few_shot   adapter off; k examples drawn once from train (seeded) as earlier
                    user/assistant turns, and for classification the label list in the
                    system prompt, so plain prompting gets its best fair chance

The k examples are the same for every row, so every few-shot prompt shares a long
prefix that generation and the loss compute once. A row's prompt tokens are reported
beside its score: the price of prompting instead of fine-tuning.
"""

from __future__ import annotations

import random

from tunelab.data.records import Conversation, Message

LABELS_INSTRUCTION = "Answer with exactly one label from this list and nothing else.\nLabels: {labels}"
CONTENDERS = ("finetune", "base_zero_shot", "base_few_shot")


def label_instruction(labels: list[str]) -> str:
    return LABELS_INSTRUCTION.format(labels=", ".join(labels))


def draw_shots(train_rows: list[Conversation], k: int, seed: int, exclude: set[str] = frozenset()) -> list[Conversation]:
    """k single-answer training rows, drawn reproducibly (never a row whose prompt is in `exclude`)."""
    usable = [r for r in train_rows if r.prompt_messages and r.messages[-1].role == "assistant"
              and _user_text(r) not in exclude]
    return random.Random(seed).sample(usable, min(k, len(usable)))


def few_shot_messages(conv: Conversation, shots: list[Conversation], labels: list[str] | None) -> tuple[Message, ...]:
    """System (own + label list) -> shot 1 user/assistant -> ... -> the row's own turns.

    Example, k=1, labels [card_arrival, lost_card]:
        system:    "Classify the intent.\\nAnswer with exactly one label ...\\nLabels: card_arrival, lost_card"
        user:      "When will my card come?"      assistant: "card_arrival"
        user:      "I lost my card"               (the test row; the model answers next)
    """
    own = [m for m in conv.prompt_messages if m.role == "system"]
    parts = [own[0].content] if own else []
    if labels:
        parts.append(label_instruction(labels))
    system = (Message("system", "\n".join(parts)),) if parts else ()
    turns: list[Message] = []
    for shot in shots:
        turns.extend(m for m in shot.prompt_messages if m.role != "system")
        turns.append(Message("assistant", shot.answer, weight=0))  # context: never scored by the loss
    return (*system, *turns, *[m for m in conv.prompt_messages if m.role != "system"])


def contender_prompts(
    rows: list[Conversation], train_rows: list[Conversation], labels: list[str] | None, k: int, seed: int
) -> tuple[dict[str, list[tuple[Message, ...]]], list[Conversation]]:
    """Prompt messages per contender (same rows, same order), and the shots the few-shot contender saw."""
    prompts = {
        "finetune": [r.prompt_messages for r in rows],
        "base_zero_shot": [r.prompt_messages for r in rows],
    }
    shots: list[Conversation] = []
    if k > 0:
        shots = draw_shots(train_rows, k, seed, exclude={_user_text(r) for r in rows})
        prompts["base_few_shot"] = [few_shot_messages(r, shots, labels) for r in rows]
    return prompts, shots


def _user_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.prompt_messages if m.role == "user")
