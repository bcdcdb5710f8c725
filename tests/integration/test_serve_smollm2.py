"""The real model served: SmolLM2-135M-Instruct plus two adapters trained here on different tasks, in one server;
each adapter answers its own task, and the base answers neither way. Slow (two short trainings on the real model).
"""

from __future__ import annotations

import random

import pytest

from helpers import write_csv

NAMES = ["anna", "ben", "carla", "dmitri", "elif", "femi", "greta", "hugo", "ines", "jonas", "kenji", "lena"]
TOPICS = ["my card", "the phone", "my card again", "a phone call"]
# Two tasks on the same messages: which topic a message is about, in two label vocabularies.
TASKS = {"topic": {"card": "card_issue", "phone": "phone_issue"}, "colour": {"card": "blue", "phone": "green"}}


def _rows(task: str, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(64):
        topic = rng.choice(TOPICS)
        text = f"hello, this is {rng.choice(NAMES)}, i have a question about {topic}"
        rows.append((text, TASKS[task]["card" if "card" in topic else "phone"]))
    return rows


@pytest.mark.slow
def test_two_adapters_and_the_base_in_one_server(tmp_path):
    import tunelab as tl
    from serving import Collected
    from tunelab.config import RunConfig, ServeConfig
    from tunelab.data.records import Message
    from tunelab.data.tokenize import render_prompt
    from tunelab.registry import Registry
    from tunelab.serve.engine import Request
    from tunelab.serve.server import build_state

    runs = {}
    for task in TASKS:
        data = write_csv(tmp_path / f"{task}.csv", _rows(task, seed=len(task)))
        cfg = RunConfig.model_validate({
            "data": {"path": str(data), "input_column": "text", "output_column": "label"},
            "lora": {"rank": 8, "alpha": 16},
            "train": {"epochs": 4, "batch_size": 8, "learning_rate": 3e-3, "val_rows": 0},
            "output_dir": str(tmp_path / "runs"), "name": task,
        })
        runs[task] = tl.train(cfg).path

    state = build_state(ServeConfig(models=[str(p) for p in runs.values()], max_lora_rank=8),
                        registry=Registry(tmp_path / "registry"))
    try:
        questions = {"card": "hello, this is zoe, i have a question about my card",
                     "phone": "hello, this is yusuf, i have a question about the phone"}
        pending = {}
        for model in [None, *runs]:  # all at once: one batch mixes the base and both adapters
            servable = state.catalog.resolve(str(runs[model]) if model else state.catalog.base_name)
            for topic, text in questions.items():
                got = Collected()
                state.engine.submit(Request(render_prompt(servable.tokenizer, [Message("user", text)]),
                                            servable.adapter, 8, servable.stop_token_ids, got))
                pending[(model, topic)] = (got, servable.tokenizer)
        answers = {key: tokenizer.decode(got.wait(120).tokens, skip_special_tokens=True).strip()
                   for key, (got, tokenizer) in pending.items()}
    finally:
        state.engine.stop(grace_seconds=5)
    for task, labels in TASKS.items():
        for topic, label in labels.items():
            assert answers[(task, topic)] == label, (task, topic, answers)
    every_label = {label for labels in TASKS.values() for label in labels.values()}
    assert not {answers[(None, topic)] for topic in questions} & every_label, answers
