"""JSON answers (`response_format` json_object or json_schema), enforced token by token.

Each step, before a constrained row's token is chosen, every token that would make the answer stop
being a prefix of valid JSON (for json_schema: of JSON that follows the schema) gets -inf; the end
of turn is allowed only once the JSON is complete. So a finished answer always parses, whatever the
model would have preferred; an answer cut by max_tokens ends with finish_reason "length", as
OpenAI's does.

Why llguidance and not hand-written code: matching a grammar against a 49k-token vocabulary in
well under a millisecond per step needs a lexer over token tries and JSON-schema compilation,
which llguidance (what vLLM, SGLang and llama.cpp use) does; the engine only applies its bitmask.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.serve.protocol import ResponseFormat

# Between JSON tokens, up to 16 whitespace characters: enough for indented JSON, and a bound, so a
# model cannot fill max_tokens with blank lines (the failure OpenAI warns about for json_object).
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # json_object: one JSON object, any keys
_BIT = torch.arange(32, dtype=torch.int32)  # bit k of a bitmask word is token 32 * word + k


class BadFormat(ValueError):
    """The response_format cannot be enforced (an invalid schema, a tokenizer llguidance cannot read)."""


class JsonConstraint:
    """One answer's grammar state: which tokens may come next, and the tokens chosen so far.

    Used by the engine thread only (after construction), one call of each per step.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = torch.empty((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the answer valid (the end of turn only when it is complete)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits)
        bits = (self._bits[0].unsqueeze(1) >> _BIT) & 1  # (words, 32)
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # the mask made this impossible: our bug, not the client's
            raise RuntimeError(f"the JSON grammar refused token {token}: {self.matcher.get_error()}")


class Grammars:
    """Builds constraints for one server; llguidance's view of a tokenizer (about a second to build) is kept
    per tokenizer and end-of-turn set."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # the model's logits: may be larger than the tokenizer's vocabulary
        self._tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def constraint(self, fmt: ResponseFormat, tokenizer: PreTrainedTokenizerBase,
                   stop_token_ids: frozenset[int]) -> JsonConstraint:
        """The constraint for one answer; raises BadFormat saying why it cannot be enforced."""
        from llguidance import LLMatcher

        schema = ANY_OBJECT if fmt.type == "json_object" else (fmt.json_schema.schema_ or {})
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise BadFormat(f"the JSON schema is not valid: {exc}") from None
        matcher = LLMatcher(self._ll_tokenizer(tokenizer, stop_token_ids), grammar, log_level=0)
        if matcher.is_error():
            raise BadFormat(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        return JsonConstraint(matcher, self.vocab_size)

    def _ll_tokenizer(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: frozenset[int]) -> Any:
        import llguidance.hf

        stops = tuple(sorted(stop_token_ids))
        with self._lock:
            built = self._tokenizers.setdefault(tokenizer, {})
            if stops not in built:
                try:
                    built[stops] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                                eos_token=list(stops))
                except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads fast ones only
                    raise BadFormat(f"this model's tokenizer cannot be used for JSON answers: {exc}") from None
            return built[stops]
