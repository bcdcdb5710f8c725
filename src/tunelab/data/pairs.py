r"""Preference pairs as token rows: a chosen and a rejected row per pair, batched together (DPO's data).

Worked example (ChatML, as SmolLM2's template; tokens as the tiny test tokenizer splits them):

    pair:  prompt (user: "2+2?")   chosen (assistant: "4")   rejected (assistant: "5")

    chosen row   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>
    rejected row <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>

    tokens (end)  ...  <|im_start|>   as   sistant   \n     4 | 5   <|im_end|>
    labels (end)  ...      -100      -100   -100    -100    4 | 5   <|im_end|>      (39 tokens, 2 scored)

Only the completion and its end-of-turn token are scored. Assistant turns inside the prompt are
context (weight 0): a preference compares the completions, not the conversation that led to them.
A batch of B pairs is one `Batch` of 2B rows, chosen rows first, so one forward serves both sides;
the rows share the prompt, so the shared-prefix pass often applies too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from tunelab.data.batches import Batch, collate
from tunelab.data.records import Conversation, Message, PreferencePair
from tunelab.data.tokenize import TokenizedExample, tokenize_conversations

_UNLIMITED = 1 << 62  # tokenize without dropping: pairs are dropped here, as a whole


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    chosen: TokenizedExample  # labels only on the chosen completion (+ end-of-turn)
    rejected: TokenizedExample  # labels only on the rejected completion (+ end-of-turn)
    source: str  # "file:line"

    @property
    def length(self) -> int:
        """Tokens of the longer row: the padded width this pair needs (for length grouping)."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    @property
    def input_tokens(self) -> int:
        """Real input tokens of both rows: a pair goes through the model twice (as `PairBatch.real_tokens`)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def scored_conversation(pair: PreferencePair, completion: tuple[Message, ...]) -> Conversation:
    """prompt + completion, with only the completion's assistant messages trained (weight 1)."""
    context = tuple(replace(m, weight=0) if m.role == "assistant" else m for m in pair.prompt)
    answer = tuple(replace(m, weight=1) if m.role == "assistant" else m for m in completion)
    return Conversation(context + answer, pair.source)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], max_length: int
) -> tuple[list[TokenizedPair], list[str]]:
    """Tokenize both sides (two batched calls); a pair is dropped when either row is longer than max_length.
    Returns (kept pairs, sources of the dropped)."""
    chosen, _ = tokenize_conversations(tokenizer, [scored_conversation(p, p.chosen) for p in pairs], _UNLIMITED)
    rejected, _ = tokenize_conversations(tokenizer, [scored_conversation(p, p.rejected) for p in pairs], _UNLIMITED)
    kept: list[TokenizedPair] = []
    dropped: list[str] = []
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        if max(len(c.input_ids), len(r.input_ids)) > max_length:
            dropped.append(pair.source)
        else:
            kept.append(TokenizedPair(c, r, pair.source))
    return kept, dropped


@dataclass
class PairBatch:
    batch: Batch  # 2B rows: rows [0, B) the chosen answers, rows [B, 2B) the rejected ones, same order
    pairs: int  # B

    @property
    def real_tokens(self) -> int:
        return self.batch.real_tokens

    @property
    def trained_tokens(self) -> int:
        return self.batch.trained_tokens

    @property
    def loss_units(self) -> int:
        """DPO's loss is a sum over pairs, divided by the pairs of the whole step."""
        return self.pairs


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, share_prefix: bool = True) -> PairBatch:
    """B pairs -> one right-padded Batch of 2B rows (chosen first), so one forward serves both sides."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return PairBatch(collate(rows, pad_id, share_prefix=share_prefix), len(pairs))
