"""tunelab.data.tokenize: which tokens carry loss, and what is dropped."""

from __future__ import annotations

from tunelab.data.records import Conversation, Message
from tunelab.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_conversations

EOT = "<|im_end|>"


def conv(*messages: Message, source: str = "test:1") -> Conversation:
    return Conversation(tuple(messages), source)


def trained_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained label ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for x in labels:
        if x != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(x)
        previous = x
    return runs


def test_mask_covers_exactly_the_answer_and_end_of_turn(tiny_tokenizer):
    answer = "card_arrival"
    c = conv(Message("system", "Classify the intent."), Message("user", "where is my card"), Message("assistant", answer))
    (ex,), dropped = tokenize_conversations(tiny_tokenizer, [c], max_length=512)
    assert dropped == []
    assert len(ex.labels) == len(ex.input_ids)
    # A trained position's label is the token at that position (the loss shifts later).
    for tok, lab in zip(ex.input_ids, ex.labels):
        assert lab in (IGNORE_INDEX, tok)
    runs = trained_runs(ex.labels)
    assert len(runs) == 1
    assert tiny_tokenizer.decode(runs[0], skip_special_tokens=False) == answer + EOT
    assert ex.trained_tokens == len(runs[0])
    # Everything before the answer is the prompt exactly as rendered for generation.
    prompt = render_prompt(tiny_tokenizer, c.prompt_messages)
    assert ex.input_ids[: len(prompt)] == prompt
    assert all(x == IGNORE_INDEX for x in ex.labels[: len(prompt)])
    assert ex.input_ids[len(prompt) :] == runs[0]


def test_trailing_newline_after_last_end_of_turn_is_dropped(tiny_tokenizer):
    c = conv(Message("user", "hello world"), Message("assistant", "good morning"))
    (ex,), _ = tokenize_conversations(tiny_tokenizer, [c], max_length=512)
    full = tiny_tokenizer.apply_chat_template(c.as_dicts(), tokenize=False)
    assert full.endswith(EOT + "\n")
    full_ids = tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    eot_id = tiny_tokenizer.convert_tokens_to_ids(EOT)
    assert ex.input_ids[-1] == eot_id
    assert ex.labels[-1] == eot_id
    assert ex.input_ids == full_ids[:-1]
    assert tiny_tokenizer.decode(full_ids[-1:]) == "\n"


def test_multi_turn_trains_both_assistant_turns(tiny_tokenizer):
    c = conv(
        Message("user", "what is two plus two"),
        Message("assistant", "four"),
        Message("user", "thank you"),
        Message("assistant", "good night"),
    )
    (ex,), _ = tokenize_conversations(tiny_tokenizer, [c], max_length=512)
    decoded = [tiny_tokenizer.decode(r, skip_special_tokens=False) for r in trained_runs(ex.labels)]
    assert decoded == ["four" + EOT, "good night" + EOT]


def test_assistant_message_with_weight_zero_is_not_trained(tiny_tokenizer):
    c = conv(
        Message("user", "what is two plus two"),
        Message("assistant", "maybe", weight=0),
        Message("user", "thank you"),
        Message("assistant", "good night"),
    )
    (ex,), _ = tokenize_conversations(tiny_tokenizer, [c], max_length=512)
    decoded = [tiny_tokenizer.decode(r, skip_special_tokens=False) for r in trained_runs(ex.labels)]
    assert decoded == ["good night" + EOT]
    # The weight-0 turn is still in the input (context), just not in the labels.
    assert "maybe" + EOT in tiny_tokenizer.decode(ex.input_ids, skip_special_tokens=False)


def test_too_long_examples_are_dropped_and_reported(tiny_tokenizer):
    short = conv(Message("user", "yes"), Message("assistant", "no"), source="data.csv:2")
    long = conv(Message("user", "the quick brown fox jumps over the lazy dog " * 4), Message("assistant", "no"),
                source="data.csv:3")
    n_short = len(tiny_tokenizer.apply_chat_template(short.as_dicts(), tokenize=True, return_dict=False))
    max_length = n_short + 2
    kept, dropped = tokenize_conversations(tiny_tokenizer, [short, long, short], max_length=max_length)
    assert dropped == ["data.csv:3"]
    assert [e.source for e in kept] == ["data.csv:2", "data.csv:2"]
    assert all(len(e.input_ids) <= max_length for e in kept)


def test_batch_tokenization_equals_one_at_a_time(tiny_tokenizer):
    convs = [
        conv(Message("user", "hello world"), Message("assistant", "yes"), source="a"),
        conv(Message("system", "Classify the intent."), Message("user", "good morning"),
             Message("assistant", "refund"), source="b"),
    ]
    together, _ = tokenize_conversations(tiny_tokenizer, convs, max_length=512)
    alone = [tokenize_conversations(tiny_tokenizer, [c], max_length=512)[0][0] for c in convs]
    assert together == alone


def test_no_conversations(tiny_tokenizer):
    assert tokenize_conversations(tiny_tokenizer, [], max_length=64) == ([], [])
