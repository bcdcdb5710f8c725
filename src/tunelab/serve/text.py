"""Tokens to text, piece by piece, for streaming: never a broken character, never part of a stop string.

    >>> pieces = TextPieces(tokenizer, stops=["\\n\\n"])   # doctest: +SKIP
    >>> pieces.add([ids of "Hello"]), pieces.add([ids of " wor"]), pieces.add([ids of "ld\\n"])
    ('Hello', ' wor', 'ld')          # the "\\n" is held back: it may start the stop string "\\n\\n"
    >>> pieces.add([ids of "\\nMore"]); pieces.stopped
    ''  True                         # the stop string ends the answer, and is not part of it

Why decode the whole answer each time instead of each token alone: a byte-level BPE splits one
character (an emoji, an accented letter) over several tokens, and a word's leading space belongs
to its token; only the decoded whole is right. Answers are at most a few thousand tokens.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what decoding shows for the first bytes of a character whose last byte has not come yet


class TextPieces:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far (cut before a stop string once one appeared)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string appeared: the answer is complete

    def add(self, ids: list[int]) -> str:
        """The text that became certain with these tokens."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = text[: min(found)], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - _held_back(text, self.stops)
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        return self._take(safe)

    def flush(self) -> str:
        """Everything not handed out yet: the answer has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may yet complete one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
