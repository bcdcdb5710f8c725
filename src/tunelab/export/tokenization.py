"""Does llama.cpp tokenize like training did? The training tokenizer against what a GGUF's metadata implies.

    implied = implied_tokenizer(gguf.GGUFReader(path))       # tokens + merges + llama.cpp's pre-tokenizer regexes
    record = compare_tokenization(run_tokenizer, implied, pre, texts)   # TokenizationRecord: agrees, first difference

llama.cpp splits text before BPE with a fixed list of regexes per `tokenizer.ggml.pre` (`llama-vocab.cpp`,
`llama_vocab::impl::load`); `smollm` puts `\\p{N}` first, so every digit is a piece of its own. A
transformers tokenizer rebuilt from a GGUF may split otherwise (transformers 5.25 knows no `smollm` and
falls back to GPT-2's split), and then numbers reach the model as different tokens in training and in
llama.cpp / Ollama. No library reproduces llama.cpp's tokenizer in Python, so the regexes are copied here
(with their source) and run by the `tokenizers` library over the GGUF's own vocabulary and merges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf

from tunelab.export.gguf_meta import read_field
from tunelab.export.record import TokenizationRecord

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp src/llama-vocab.cpp: regex_exprs per LLAMA_VOCAB_PRE_TYPE (applied in order, each piece split again).
LLAMA_CPP_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # shared with starcoder, refact, command-r, codeshell, exaone, minerva
}

# Text where pre-tokenizers disagree: digit runs, dates, amounts, contractions, whitespace runs, non-ASCII.
PROBE_TEXTS = (
    "card 4111 1111, 12.50 EUR on 2026-01-03",
    "Transfer $1,234.56 to DE89 3704 0044 0532 0130 00 by 31/12/2025 (ref #A7-99x).",
    "I've got 3 cards; they're 2x faster, aren't they? 100% sure!!",
    "  two leading spaces,\ttabs\tand\n\nblank lines   \n",
    "naïve café — 東京 2024年, Ünïcödé 1½ ±0.5°C",
    "version 3.10.12, 0xFF, 1e-5, 007, 2,500,000.00",
)


def implied_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A `tokenizers.Tokenizer` doing what llama.cpp does with this GGUF's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = read_field(reader, gguf.Keys.Tokenizer.PRE)
    if read_field(reader, gguf.Keys.Tokenizer.MODEL) != "gpt2" or pre not in LLAMA_CPP_PRE_REGEXES:
        raise ValueError(f"no llama.cpp pre-tokenizer rendering for tokenizer.ggml.pre={pre!r}")
    tokens = read_field(reader, gguf.Keys.Tokenizer.LIST)
    types = read_field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    merges = [tuple(m.split(" ", 1)) for m in read_field(reader, gguf.Keys.Tokenizer.MERGES)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_PRE_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens in the text before splitting (parse_special).
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    tok.add_special_tokens(special)
    return tok


def compare_tokenization(tokenizer: PreTrainedTokenizerBase, implied: Tokenizer, pre: str,
                         texts: list[str]) -> TokenizationRecord:
    """Token ids of every text both ways; the first text that differs is shown with both token lists."""
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = implied.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            show = tokenizer.convert_ids_to_tokens
            return TokenizationRecord(pre_tokenizer=pre, texts=len(texts), agrees=False,
                                      first_difference=f"{text[:80]!r}: tunelab {show(ours)[:24]} vs llama.cpp "
                                                       f"{show(theirs)[:24]}")
    return TokenizationRecord(pre_tokenizer=pre, texts=len(texts), agrees=True)
