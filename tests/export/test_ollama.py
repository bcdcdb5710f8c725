"""The Modelfile's layout, learned from a chat template by rendering it; templates without that layout refused."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.export.ollama import modelfile, modelfile_check, parse_modelfile, turn_format


def with_template(tokenizer, template: str):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_chatml_layout_and_default_system(tiny_tokenizer):
    fmt = turn_format(tiny_tokenizer, where="t")
    assert (fmt.before, fmt.header_start, fmt.header_end, fmt.footer) == ("", "<|im_start|>", "\n", "<|im_end|>\n")
    assert fmt.generation == "<|im_start|>assistant\n" and fmt.default_system == "You are a helpful assistant."
    assert fmt.stops == ("<|im_end|>", "<|im_start|>")
    text = modelfile(fmt, "model-Q8_0.gguf", origin="t")
    parsed = parse_modelfile(text)
    assert parsed["FROM"] == ["./model-Q8_0.gguf"] and parsed["SYSTEM"] == ["You are a helpful assistant."]
    assert modelfile_check(text, tiny_tokenizer).passed


def test_a_template_without_a_default_system_writes_no_system_line(tiny_tokenizer):
    plain = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = with_template(tiny_tokenizer, plain)
    text = modelfile(turn_format(tok, where="t"), "m.gguf", origin="t")
    assert "SYSTEM" not in parse_modelfile(text) and modelfile_check(text, tok).passed


def test_a_wrong_modelfile_fails_its_check(tiny_tokenizer):
    text = modelfile(turn_format(tiny_tokenizer, where="t"), "m.gguf", origin="t").replace("<|im_end|>\n{{ end", "\n{{ end")
    check = modelfile_check(text, tiny_tokenizer)
    assert not check.passed and "first_difference" in check.figures


def test_a_template_that_renames_roles_is_refused_with_the_fix(tiny_tokenizer):
    gemma_like = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    with pytest.raises(TunelabError, match="cannot write an Ollama TEMPLATE.*--to gguf"):
        turn_format(with_template(tiny_tokenizer, gemma_like), where="t")
