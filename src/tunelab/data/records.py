"""The one record type: a Conversation of Messages (a PreferencePair for preference data). Types only;
`read.py` reads files into them.

Every accepted format (chat JSONL, prompt/completion, Alpaca, ShareGPT, CSV with a
column mapping, preference pairs; see tunelab/data/formats.py) is read at the edge
into these records; nothing downstream knows where a row came from except `source`
("file:line"), kept for error messages.

    CSV   text,category                    ->  Conversation(
          "Where is my card?",card_arrival        system: <system_prompt, if any>
                                                 user: "Where is my card?"
                                                 assistant: "card_arrival")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    weight: int = 1  # assistant messages only: 1 = trained, 0 = context only (OpenAI's `weight`)


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # "file:line", for error messages

    @property
    def answer(self) -> str:
        """The last assistant message: the label for classification-like data."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the last assistant message: what a model sees at inference."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last]

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages in the shape chat templates expect."""
        return [{"role": m.role, "content": m.content} for m in self.messages]



@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt and two answers to it, the chosen one preferred over the rejected one (DPO data).

        prompt:   (user: "Capital of France?",)
        chosen:   (assistant: "Paris.",)
        rejected: (assistant: "Lyon, I think.",)
    """

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]  # ends with an assistant message (usually it is just that one)
    rejected: tuple[Message, ...]  # likewise
    source: str  # "file:line", for error messages

    @property
    def chosen_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.chosen, self.source)

    @property
    def rejected_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.rejected, self.source)
