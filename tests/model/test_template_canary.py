"""tunelab.model.template_canary: the chat template and EOS token are checked where an adapter is loaded."""

from __future__ import annotations

import copy
import re

import pytest

from helpers import CHAT_TEMPLATE
from tunelab.errors import TunelabError
from tunelab.model.template_canary import (
    CANARIES,
    check_chat_template,
    check_run_tokenizer,
    first_difference,
    render_canaries,
    template_fingerprint,
)


def altered(tokenizer, **attrs):
    """A deep copy of the session tokenizer (never mutate the shared fixture) with attributes replaced."""
    clone = copy.deepcopy(tokenizer)
    for name, value in attrs.items():
        setattr(clone, name, value)
        assert getattr(clone, name) != getattr(tokenizer, name), f"{name} unchanged: the test would prove nothing"
    return clone


def test_canaries_render_the_conversations_through_the_template(tiny_tokenizer):
    renders = dict(render_canaries(tiny_tokenizer))
    assert len(renders) == len(CANARIES) == 3
    multi = renders["system, user, assistant, user + generation prompt"]
    assert multi.startswith("<|im_start|>system\nYou are a careful assistant.")
    assert multi.count("<|im_start|>user\n") == 2 and multi.endswith("<|im_start|>assistant\n")
    # No system turn: this template inserts its default one; the single turn still ends in the assistant header.
    single = renders["one user turn + generation prompt"]
    assert single.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert renders["system, user, assistant (as trained)"].endswith("card_arrival<|im_end|>\n")


def test_identical_tokenizers_pass_and_share_a_fingerprint(tiny_tokenizer):
    same = altered(tiny_tokenizer)
    check_chat_template(tiny_tokenizer, same, where="test")  # no raise
    assert template_fingerprint(tiny_tokenizer) == template_fingerprint(same)
    assert re.fullmatch(r"[0-9a-f]{64}", template_fingerprint(tiny_tokenizer))


def test_an_extra_space_in_the_role_header_fires_with_its_offset(tiny_tokenizer):
    spaced = altered(tiny_tokenizer, chat_template=CHAT_TEMPLATE.replace("'<|im_start|>' + message['role']",
                                                                         "'<|im_start|> ' + message['role']"))
    expected = render_canaries(tiny_tokenizer)[0][1]
    offset = expected.index("<|im_start|>user") + len("<|im_start|>")  # where ' user' begins in the altered one
    with pytest.raises(TunelabError) as info:
        check_chat_template(tiny_tokenizer, spaced, where="serve: banking@production")
    message = str(info.value)
    assert message.startswith("serve: banking@production: ")
    # The very first header (the system one) already differs: at character len('<|im_start|>').
    assert f"first differs at character {len('<|im_start|>')}" in message
    # 20 characters either side of character 12 (so from 0: nothing before to elide), repr'd.
    assert ("expected '<|im_start|>system\\nYou are a car'... "
            "vs actual '<|im_start|> system\\nYou are a ca'...") in message
    assert "also differs: 'one user turn + generation prompt', 'system, user, assistant (as trained)'" in message
    assert "fix: load the tokenizer saved in RUN_DIR/tokenizer, or retrain with this template" in message
    assert "eos_token" not in message  # the EOS is the same: only the template is blamed
    assert offset > len("<|im_start|>")  # sanity of the fixture: a later header exists too


def test_a_different_role_header_later_in_the_chat_names_that_offset_with_context(tiny_tokenizer):
    renamed = altered(tiny_tokenizer, chat_template=CHAT_TEMPLATE.replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>model\n'"))
    expected = render_canaries(tiny_tokenizer)[0][1]
    offset = expected.rindex("<|im_start|>assistant") + len("<|im_start|>")
    assert first_difference(expected, render_canaries(renamed)[0][1]) == offset
    with pytest.raises(TunelabError) as info:
        check_chat_template(tiny_tokenizer, renamed, where="runs/x", run_dir=None)
    message = str(info.value)
    assert f"first differs at character {offset}" in message
    # ~20 characters of context before the offset from each rendering, repr'd, so the headers are visible.
    assert repr(expected[offset - 20: offset + 20]) in message
    assert repr(render_canaries(renamed)[0][1][offset - 20: offset + 20]) in message
    assert "<|im_start|>model" in message
    # Only the generation prompt changed: the as-trained canary (no generation prompt) still agrees.
    assert "also differs: 'one user turn + generation prompt' (" in message


def test_a_different_eos_token_fires_even_when_the_template_is_the_same(tiny_tokenizer, tmp_path):
    other_eos = altered(tiny_tokenizer)
    other_eos.eos_token = "<|im_start|>"  # a special token the tiny vocabulary has
    with pytest.raises(TunelabError) as info:
        check_chat_template(tiny_tokenizer, other_eos, where="test", run_dir=tmp_path / "run")
    message = str(info.value)
    assert "eos_token '<|im_end|>' vs '<|im_start|>'" in message
    assert "first differs" not in message  # the renders agree: this template writes the token literally
    assert f"load the tokenizer saved in {tmp_path / 'run'}/tokenizer" in message
    assert template_fingerprint(tiny_tokenizer) != template_fingerprint(other_eos)


def test_a_missing_template_is_a_difference_not_a_crash(tiny_tokenizer):
    none = altered(tiny_tokenizer, chat_template=None)
    with pytest.raises(TunelabError) as info:
        check_chat_template(tiny_tokenizer, none, where="test")
    assert "vs actual '<template refused this conversation: ValueError: " in str(info.value)


def test_first_difference_on_prefixes_and_equal_strings():
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("abc", "abcd") == 3  # one is a prefix: the difference starts where it ends


def test_check_run_tokenizer_reads_the_saved_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    check_run_tokenizer(tmp_path, tiny_tokenizer)  # the saved one round-trips: no raise
    spaced = altered(tiny_tokenizer, chat_template=CHAT_TEMPLATE.replace("+ '\n' + message['content']",
                                                                         "+ '\n\n' + message['content']"))
    with pytest.raises(TunelabError, match=re.escape(f"load the tokenizer saved in {tmp_path}/tokenizer")):
        check_run_tokenizer(tmp_path, spaced)
    with pytest.raises(TunelabError, match="has no tokenizer/ folder"):
        check_run_tokenizer(tmp_path / "elsewhere", tiny_tokenizer)


def test_loading_a_run_whose_saved_template_was_altered_fails_with_the_difference(trained_run, tmp_path):
    """The canary recorded at training time fires when the run's tokenizer no longer renders the same."""
    import shutil

    from tunelab.errors import TunelabError
    from tunelab.rundir import load_run

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    load_run(run)  # unchanged: loads
    template = run / "tokenizer" / "chat_template.jinja"
    original = template.read_text()
    altered = original.replace("message['role'] + '", "message['role'] + ' ", 1)  # a space after the role header
    assert altered != original
    template.write_text(altered)
    with pytest.raises(TunelabError, match="differs at character") as info:
        load_run(run)
    assert "tokenizer" in str(info.value)
