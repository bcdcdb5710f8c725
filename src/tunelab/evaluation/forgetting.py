"""Did fine-tuning cost general ability? The base and the fine-tune on the same shipped probe.

Two measurements, both on data that ships with tunelab (src/tunelab/evaluation/probes/):

  - the probe: 100 short questions in 4 categories (knowledge, arithmetic, instruction
    following, formatting), each with a forgiving matcher. A 135M instruct model gets
    perhaps 20-50% of them; the level does not matter, the change does.
  - general text loss: mean loss per token of ~2,000 words of plain encyclopedic prose,
    cut into windows of 256 tokens (teacher forcing, every token trained).

The base is the same weights with the adapter disabled (`model.disable_adapter()`, no
second copy in memory). Full fine-tuning has no adapter to disable: pass the original
weights as `base_model`.

    flagged  <=>  probe score fell by more than `threshold` (absolute, e.g. 0.05 = 5 of 100 items)
              or  general text loss rose by more than `loss_tolerance` (relative, e.g. 0.10 = +10%)

Run it through `run_forgetting_check(model, tokenizer, precision, threshold)`; its result is
the `forgetting` object of eval.json (docs/eval-format.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.batches import Batch, collate
from tunelab.data.records import Message
from tunelab.data.tokenize import TokenizedExample, render_prompt
from tunelab.errors import TunelabError
from tunelab.evaluation.base_results import BaseResults
from tunelab.evaluation.generate import generate
from tunelab.evaluation.result import CategoryShift, Forgetting, ProbeItemResult, Shift
from tunelab.model.precision import Precision
from tunelab.model.scoring import validation_loss
from tunelab.progress import bar

log = logging.getLogger(__name__)

Category = Literal["knowledge", "arithmetic", "instruction", "format"]
Match = Literal["contains", "exact", "number", "json_keys"]
CATEGORIES: tuple[str, ...] = ("knowledge", "arithmetic", "instruction", "format")
MATCHES: tuple[str, ...] = ("contains", "exact", "number", "json_keys")
LOSS_TOLERANCE = 0.10  # relative rise of the general text loss that counts as forgetting
TEXT_WINDOW = 256  # tokens per window of the general text (SmolLM2 reads 8k; short windows keep memory flat)
TEXT_BATCH = 8  # windows per forward pass


@dataclass(frozen=True, slots=True)
class ProbeItem:
    id: str
    category: Category
    prompt: str  # sent as the only user message, under the model's chat template
    answer: str  # contains: alternatives joined by "|"; json_keys: required keys joined by ","
    match: Match


def load_probe() -> list[ProbeItem]:
    """The shipped general-ability probe (probes/general.jsonl), in file order."""
    text = resources.files("tunelab.evaluation").joinpath("probes/general.jsonl").read_text(encoding="utf-8")
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            item = ProbeItem(row["id"], row["category"], row["prompt"], row["answer"], row["match"])
            assert item.category in CATEGORIES and item.match in MATCHES, f"general.jsonl:{n}: {row}"
            items.append(item)
    return items


def load_general_text() -> str:
    """~2,000 words of original encyclopedic prose (probes/general_text.txt)."""
    return resources.files("tunelab.evaluation").joinpath("probes/general_text.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------- matchers

_NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
# 1,234,567 / 42 / -3.5; thousands separators only in groups of three, so "1, 2, 3" reads as 1.
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)|\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE
)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def first_number(output: str) -> float | None:
    """The first number in `output` (digits or a word up to ninety); after the last '=' if there is one.

    >>> first_number("17 + 25 = 42."), first_number("There are seven days."), first_number("none")
    (42.0, 7.0, None)
    """
    # A model that shows its working ("17 + 25 = 42") states the result after the last '='.
    tail = output.rsplit("=", 1)[-1]
    m = _NUMBER.search(tail)
    if m is None:
        return None
    if m.group(1):
        return float(_NUMBER_WORDS[m.group(1).lower()])
    return float(m.group(0).replace(",", ""))


def _json_object(output: str) -> Any:
    """The JSON object in `output`: inside a ``` fence if any, else from the first '{' to the last '}'."""
    fenced = _FENCE.search(output)
    text = fenced.group(1) if fenced else output
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        return json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None


def score_probe_answer(item: ProbeItem, output: str) -> bool:
    """Does `output` answer `item`? Forgiving about form, strict about content.

    contains   one of the "|"-separated answers appears as a whole word, any case ("Paris." for Paris;
               not "Parisian")
    exact      the whole output equals the answer, case included, once surrounding white space and one
               trailing period are dropped ("BANANA." for BANANA; not "Banana" nor "BANANA!!")
    number     the first number in the output (see `first_number`) equals the answer
    json_keys  the output holds a JSON object (bare or in a ``` fence) with every listed key
    """
    if item.match == "contains":
        return any(
            re.search(r"(?<!\w)" + re.escape(alt.strip()) + r"(?!\w)", output, re.IGNORECASE)
            for alt in item.answer.split("|")
        )
    if item.match == "exact":
        text = output.strip()
        text = text[:-1] if text.endswith(".") and not item.answer.endswith(".") else text
        return text.strip() == item.answer
    if item.match == "number":
        value = first_number(output)
        return value is not None and abs(value - float(item.answer)) < 1e-9
    if item.match == "json_keys":
        obj = _json_object(output)
        return isinstance(obj, dict) and all(k.strip() in obj for k in item.answer.split(","))
    raise AssertionError(f"unknown matcher {item.match!r}")


# ---------------------------------------------------------------- the verdict

def forgetting_verdict(
    base_score: float, ft_score: float, base_loss: float, ft_loss: float, threshold: float, loss_tolerance: float
) -> tuple[bool, str]:
    """(flagged, one sentence why). Pure, so the rule is tested on constructed numbers.

    >>> forgetting_verdict(0.41, 0.39, 2.91, 2.95, 0.05, 0.10)[0]
    False
    """
    # Rounded: 0.46 - 0.41 is 0.05000000000000004 in floating point, and 5 of 100 is not *more* than 0.05.
    drop = round(base_score - ft_score, 9)
    rise = round((ft_loss - base_loss) / base_loss, 9) if base_loss > 0 else 0.0
    probe_bad, loss_bad = drop > threshold, rise > loss_tolerance
    probe_part = (
        f"probe score fell {drop:.2f}" if drop > 0 else f"probe score rose {-drop:.2f}" if drop < 0 else "probe score held"
    ) + f" ({base_score:.2f} -> {ft_score:.2f}, threshold {threshold:.2f})"
    loss_part = (
        f"general text loss {'rose' if rise >= 0 else 'fell'} {abs(rise):.1%} ({base_loss:.3f} -> {ft_loss:.3f}, "
        f"tolerance {loss_tolerance:.0%})"
    )
    if probe_bad or loss_bad:
        causes = " and ".join(c for c, bad in ((probe_part, probe_bad), (loss_part, loss_bad)) if bad)
        others = [p for p, bad in ((probe_part, probe_bad), (loss_part, loss_bad)) if not bad]
        return True, f"Forgetting flagged: {causes}" + (f"; {others[0]}." if others else ".")
    return False, f"No sign of forgetting: {probe_part}; {loss_part}."


# ---------------------------------------------------------------- the check

def run_forgetting_check(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    precision: Precision,
    threshold: float,
    batch_size: int | None = None,  # None: sized by tokens (generate.length_batches)
    max_new_tokens: int = 48,
    *,
    base_model: PreTrainedModel | None = None,
    loss_tolerance: float = LOSS_TOLERANCE,
    items: list[ProbeItem] | None = None,
    reuse: BaseResults | None = None,
) -> Forgetting:
    """Probe and general text loss for the base and the fine-tune: eval.json's `forgetting` object.

    `model` is the fine-tune. The base is `model` with its adapter disabled, or `base_model` when
    given (full fine-tuning: the original weights, loaded separately; same tokenizer). `items`
    replaces the shipped probe (tests use a few items). `reuse`: where the base's answers and text
    loss from an earlier evaluation on this machine are read back, and kept (base_results.py).
    """
    if base_model is None and not isinstance(model, PeftModel):
        raise TunelabError(
            "the forgetting check needs the base model: this fine-tune has no adapter to disable",
            fix="pass base_model= (the original weights) for full fine-tuning, or set eval.forgetting_probe: false",
        )
    items = items if items is not None else load_probe()
    prompts = [render_prompt(tokenizer, [Message("user", item.prompt)]) for item in items]
    text_batches = _text_batches(tokenizer)
    was_training = model.training
    model.eval()

    def base_state() -> contextlib.AbstractContextManager:
        return model.disable_adapter() if base_model is None else contextlib.nullcontext()

    contenders = {"base": (base_model if base_model is not None else model, base_state), "finetune": (model, contextlib.nullcontext)}
    ok: dict[str, list[bool]] = {}
    loss: dict[str, float] = {}
    key = None
    if reuse is not None:
        key = reuse.key("forgetting", tokenizer, separate_base=base_model is not None, prompts=prompts,
                        items=[dataclasses.astuple(item) for item in items], text=[b.input_ids.tolist() for b in text_batches],
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
        stored = reuse.get(key)
        if (stored is not None and isinstance(stored.get("ok"), list) and len(stored["ok"]) == len(items)
                and isinstance(stored.get("loss"), float)):  # anything else (an edited file) is computed again
            ok["base"], loss["base"] = [bool(x) for x in stored["ok"]], stored["loss"]
            del contenders["base"]
            log.info("forgetting: the base's answers read back from an earlier evaluation (%s)", reuse.root)
    for name, (net, state) in contenders.items():
        with bar(f"forgetting probe {name}", len(prompts), transient=True) as (progress, task):
            with state():
                run = generate(
                    net, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    precision=precision, stop_token_ids=[tokenizer.eos_token_id],
                    on_batch=lambda n: progress.advance(task, n),
                )
                loss[name] = validation_loss(net, text_batches, precision)
        ok[name] = [score_probe_answer(item, g.text) for item, g in zip(items, run.generations)]
        if name == "base" and key is not None:
            reuse.put(key, {"ok": ok["base"], "loss": loss["base"]})
    model.train(was_training)

    n = len(items)
    score = {name: sum(flags) / n if n else 0.0 for name, flags in ok.items()}
    flagged, why = forgetting_verdict(score["base"], score["finetune"], loss["base"], loss["finetune"],
                                      threshold, loss_tolerance)
    categories = {}
    for cat in CATEGORIES:
        idx = [i for i, item in enumerate(items) if item.category == cat]
        if idx:
            b, f = (sum(ok[k][i] for i in idx) / len(idx) for k in ("base", "finetune"))
            categories[cat] = CategoryShift(items=len(idx), base=b, finetune=f, delta=f - b)
    log.info("forgetting: %s", why)
    return Forgetting(
        probe_items=n,
        probe=Shift(base=score["base"], finetune=score["finetune"], delta=score["finetune"] - score["base"]),
        general_text_loss=Shift(base=loss["base"], finetune=loss["finetune"], delta=loss["finetune"] - loss["base"]),
        general_text_tokens=sum(b.trained_tokens for b in text_batches),
        threshold=threshold, loss_tolerance=loss_tolerance, flagged=flagged, why=why, categories=categories,
        items=[ProbeItemResult(id=item.id, category=item.category, base_ok=b, finetune_ok=f)
               for item, b, f in zip(items, ok["base"], ok["finetune"])],
        base_reused="base" not in contenders,
    )


def _text_batches(tokenizer: PreTrainedTokenizerBase, window: int = TEXT_WINDOW) -> list[Batch]:
    """The general text as batches of windows, every token trained (its first in each window has no context).

    ~2,000 words -> ~2,600 SmolLM2 tokens -> 11 windows of 256 -> 2 batches of 8.
    """
    ids = tokenizer(load_general_text(), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]  # a 1-token tail predicts nothing
    examples = [TokenizedExample(w, list(w), f"general_text.txt:window{i}") for i, w in enumerate(windows)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(examples[i : i + TEXT_BATCH], pad, share_prefix=False) for i in range(0, len(examples), TEXT_BATCH)]
