r"""Conversation -> input_ids + labels, rendered by the model's own chat template.

Labels are -100 (ignored by the loss) everywhere except the tokens of assistant
messages with weight 1 *and* the end-of-turn token that closes each of them, so
the model learns both the answer and when to stop.

Worked example (SmolLM2-135M-Instruct; its template is ChatML):

    system: "Classify the intent."   user: "Where is my card?"   assistant: "card_arrival"

    rendered: <|im_start|>system\nClassify the intent.<|im_end|>\n<|im_start|>user\n
              Where is my card?<|im_end|>\n<|im_start|>assistant\ncard_arrival<|im_end|>\n

    tokens  ... <|im_start|>  ass  istant  \n   card   _   arr  ival  <|im_end|>  \n
    ids     ...      1        520   9531  198  12172  79  2110  2264      2      198
    labels  ...    -100      -100   -100 -100  12172  79  2110  2264      2     -100

Only "card_arrival" and <|im_end|> are trained (5 of 30 tokens). The newline the
template writes after <|im_end|> is not: generation stops at <|im_end|>. Tokens after
the last trained one are dropped (29 tokens kept): under causal attention they
cannot change the loss.

How the spans are found: each assistant turn's characters are located by rendering
the conversation up to that turn with `add_generation_prompt=True` (its prefix) and
through that turn; the full text is tokenized once with character offsets, and a
token is trained when it lies inside an assistant span. This works for any template
that renders earlier turns identically as a prefix, and says so when one does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunelab.data.records import Conversation, Message
from tunelab.errors import TunelabError

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    source: str

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def length(self) -> int:
        """Tokens in the row (what length grouping sorts by)."""
        return len(self.input_ids)

    @property
    def input_tokens(self) -> int:
        """Real input tokens this example puts through the model (as a step's `real_tokens` counts them)."""
        return len(self.input_ids)


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that closes an assistant turn: what generation stops on."""
    if not tokenizer.eos_token:
        raise TunelabError(
            "the tokenizer has no eos_token, so the model cannot learn to stop",
            fix="use a chat model whose tokenizer_config.json sets eos_token",
        )
    return tokenizer.eos_token


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise TunelabError(
            "the tokenizer has no chat template", fix="use an instruct/chat model (its tokenizer must carry a chat_template)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: tuple[Message, ...] | list[Message]) -> list[int]:
    """Token ids of a prompt ending with the assistant header, ready for generation."""
    text = render(tokenizer, [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The fully rendered text and the [start, end) character spans to train on."""
    eot = end_of_turn_token(tokenizer)
    dicts = conv.as_dicts()
    full = render(tokenizer, dicts, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(conv.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        prefix = render(tokenizer, dicts[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, dicts[: i + 1], add_generation_prompt=False)
        if not (full.startswith(prefix) and through.startswith(prefix) and full.startswith(through)):
            raise TunelabError(
                "the chat template does not render earlier turns as a prefix of later ones, so assistant tokens "
                "cannot be located",
                fix="use a template that renders conversations incrementally (e.g. ChatML)",
                where=conv.source,
            )
        content_at = through.find(message.content, len(prefix))
        end = through.find(eot, content_at + len(message.content)) if content_at >= 0 else -1
        if end < 0:
            raise TunelabError(
                f"the chat template does not close the assistant turn with {eot!r}",
                fix="use a template that ends assistant turns with the tokenizer's eos_token",
                where=conv.source,
            )
        spans.append((len(prefix), end + len(eot)))
    return full, spans


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase, convs: list[Conversation], max_length: int
) -> tuple[list[TokenizedExample], list[str]]:
    """Tokenize many conversations at once. Returns (kept examples, sources of those dropped as too long)."""
    if not convs:
        return [], []
    rendered = [assistant_char_spans(tokenizer, c) for c in convs]
    # One batched call: the Rust tokenizer parallelises and gives offsets for every token.
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    kept: list[TokenizedExample] = []
    too_long: list[str] = []
    for conv, (_, spans), ids, offsets in zip(convs, rendered, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) > max_length:
            too_long.append(conv.source)
            continue
        labels = [
            tok if any(s <= start and end <= e for s, e in spans) and end > start else IGNORE_INDEX
            for tok, (start, end) in zip(ids, offsets)
        ]
        # Tokens after the last trained one (the template's trailing "\n") cannot change any loss
        # under causal attention: drop them rather than spend compute on them.
        last = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=len(labels) - 1)
        kept.append(TokenizedExample(list(ids[: last + 1]), labels[: last + 1], conv.source))
    return kept, too_long
