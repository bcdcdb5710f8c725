"""llama.cpp's pre-tokenizers over a GGUF vocabulary, against the training tokenizer: agreement, and a found gap."""

from __future__ import annotations

import gguf

from tunelab.export.tokenization import PROBE_TEXTS, compare_tokenization, implied_tokenizer


def write_vocab_gguf(path, tokenizer, pre: str):
    """A GGUF holding only a tokenizer's vocabulary, merges and pre-tokenizer name."""
    import json

    from tunelab.export.gguf_meta import KV, _vocab, add_kvs

    tokens, types = _vocab(tokenizer, len(tokenizer))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    s, arr = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    writer = gguf.GGUFWriter(path, arch="llama")
    add_kvs(writer, [KV("tokenizer.ggml.model", "gpt2", s), KV("tokenizer.ggml.pre", pre, s),
                     KV("tokenizer.ggml.tokens", tokens, arr, s),
                     KV("tokenizer.ggml.token_type", types, arr, gguf.GGUFValueType.INT32),
                     KV("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in merges], arr, s)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def digit_tokenizer():
    """A byte-level BPE whose merges join digits ("12", "2026"): what GPT-2's split allows and smollm's does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["card 4111 1111 12.50 on 2026-01-03 and 2026 again 1111"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_the_same_pre_tokenizer_agrees_on_numbers_and_chat_text(tiny_tokenizer, tmp_path):
    reader = write_vocab_gguf(tmp_path / "v.gguf", tiny_tokenizer, "gpt-2")
    texts = [*PROBE_TEXTS, tiny_tokenizer.apply_chat_template([{"role": "user", "content": "card 12"}], tokenize=False)]
    record = compare_tokenization(tiny_tokenizer, implied_tokenizer(reader), "gpt-2", texts)
    assert record.agrees and record.texts == len(texts)


def test_smollm_splitting_digits_is_found_when_training_did_not(tmp_path):
    tokenizer = digit_tokenizer()
    assert any(len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit() for t in tokenizer.get_vocab())
    reader = write_vocab_gguf(tmp_path / "v.gguf", tokenizer, "smollm")
    record = compare_tokenization(tokenizer, implied_tokenizer(reader), "smollm", list(PROBE_TEXTS))
    assert not record.agrees and "card 4111 1111" in record.first_difference
