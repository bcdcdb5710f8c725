"""The chat-template canary: is the template a model is served with the one it was trained with?

Train/serve template mismatch is the most reported pain of fine-tuning ("good in
training, bad when served"): a different role header, a stray space or another EOS
token and the adapter sees prompts it never saw. So the tokenizer (template + EOS)
travels with every adapter (RUN_DIR/tokenizer) and, wherever an adapter is loaded
against some tokenizer, both render the same fixed canary conversations and must agree:

    from tunelab.model.template_canary import check_chat_template
    check_chat_template(trained_tokenizer, serving_tokenizer, where="serve: banking@production")

A mismatch raises TunelabError naming the first differing character with context (an
extra space in the role header here):

    serve: banking@production: the chat template or EOS token differs from the one the
    adapter was trained with: canary 'system, user, assistant, user + generation prompt'
    first differs at character 12: expected '<|im_start|>system\\nYou are a car'... vs actual
    '<|im_start|> system\\nYou are a ca'...; also differs: 'one user turn + generation prompt', ...
    (fix: load the tokenizer saved in RUN_DIR/tokenizer, or retrain with this template)

and a different EOS token as "eos_token '<|im_end|>' vs '</s>'".

`template_fingerprint(tokenizer)` hashes the same renders + the EOS token: two tokenizers
with equal fingerprints format every canary identically (what the registry records).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REFUSED = "<template refused this conversation:"
CONTEXT = 20  # characters shown before and after the first difference: ~40 from each rendering

_SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer in one word."}
_USER_1 = {"role": "user", "content": "Where is my card?\nIt was sent last week."}
_ASSISTANT = {"role": "assistant", "content": "card_arrival"}
_USER_2 = {"role": "user", "content": "And the exchange rate?"}

# (name, messages, add_generation_prompt). The first two are what serving renders (a prompt
# ending in the assistant header); the third is what training renders (a finished assistant
# turn, so a template that closes turns differently at train time is caught as well).
CANARIES: tuple[tuple[str, list[dict[str, str]], bool], ...] = (
    ("system, user, assistant, user + generation prompt", [_SYSTEM, _USER_1, _ASSISTANT, _USER_2], True),
    ("one user turn + generation prompt", [_USER_1], True),
    ("system, user, assistant (as trained)", [_SYSTEM, _USER_1, _ASSISTANT], False),
)


def render_canaries(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """[(canary name, rendered text)]: each canary through the tokenizer's own `apply_chat_template`.

    A template that refuses a canary (no template at all, or one that rejects a system turn,
    like Gemma's) renders as a marker line instead of raising, so two tokenizers that refuse
    the same way still compare equal and one that refuses while the other renders differs.
    """
    out = []
    for name, messages, generation_prompt in CANARIES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja2.TemplateError, ValueError (no template), ...
            text = f"{REFUSED} {type(exc).__name__}: {exc}>"
        out.append((name, str(text)))
    return out


def template_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 (hex) of every canary rendering and the eos_token: equal means 'formats chats the same'."""
    payload = {"renders": render_canaries(tokenizer), "eos_token": tokenizer.eos_token}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def first_difference(expected: str, actual: str) -> int | None:
    """Offset of the first differing character (the shorter length when one is a prefix), None if equal."""
    if expected == actual:
        return None
    for i, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            return i
    return min(len(expected), len(actual))


def _excerpt(text: str, offset: int) -> str:
    # repr() so that whitespace, the usual culprit, is visible: '\n<|im_start|> user' vs '\n<|im_start|>user'.
    start, end = max(0, offset - CONTEXT), offset + CONTEXT
    return ("..." if start else "") + repr(text[start:end]) + ("..." if end < len(text) else "")


def template_differences(expected: PreTrainedTokenizerBase, actual: PreTrainedTokenizerBase) -> list[str]:
    """How `actual` formats chats differently from `expected`, one sentence each ([] when they agree)."""
    return _differences(record_template(expected), record_template(actual))


def record_template(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What a run records about its chat template (data.json): every canary rendering, the EOS, the fingerprint."""
    return {"renders": [list(r) for r in render_canaries(tokenizer)], "eos_token": tokenizer.eos_token,
            "fingerprint": template_fingerprint(tokenizer)}


def check_recorded_template(recorded: dict, actual: PreTrainedTokenizerBase, where: str,
                            run_dir: Path | None = None) -> None:
    """Like `check_chat_template`, against the renderings a run recorded when it trained."""
    problems = _differences(recorded, record_template(actual))
    if problems:
        saved = f"{run_dir}/tokenizer" if run_dir is not None else "RUN_DIR/tokenizer"
        raise TunelabError(
            "the chat template or EOS token differs from the one the adapter was trained with: " + "; ".join(problems),
            fix=f"load the tokenizer saved in {saved} unchanged (with the transformers version it was trained "
                "with), or retrain with this template",
            where=where,
        )


def _differences(expected: dict, actual: dict) -> list[str]:
    """The first differing canary is described in full; the others are only named, since a
    changed header usually shows up in all of them and one excerpt is what a reader needs.
    """
    problems: list[str] = []
    differing = []
    for (name, want), (_, got) in zip(expected["renders"], actual["renders"]):
        offset = first_difference(want, got)
        if offset is None:
            continue
        differing.append(name)
        if len(differing) > 1:
            continue
        if got.startswith(REFUSED) or want.startswith(REFUSED):
            problems.append(f"canary '{name}': expected {want[:200]!r} vs actual {got[:200]!r}")
        else:
            problems.append(f"canary '{name}' first differs at character {offset}: "
                            f"expected {_excerpt(want, offset)} vs actual {_excerpt(got, offset)}")
    if len(differing) > 1:
        problems.append("also differs: " + ", ".join(f"'{name}'" for name in differing[1:]))
    if expected["eos_token"] != actual["eos_token"]:
        problems.append(f"eos_token {expected['eos_token']!r} vs {actual['eos_token']!r}")
    return problems


def check_chat_template(
    expected: PreTrainedTokenizerBase, actual: PreTrainedTokenizerBase, where: str, *, run_dir: Path | None = None
) -> None:
    """Raise TunelabError when `actual` (what is loaded now) formats chats unlike `expected` (what was trained).

    `where` names the place of the check (a run directory, `serve: NAME@production`);
    `run_dir`, when known, makes the fix point at the exact tokenizer folder to load.
    """
    problems = template_differences(expected, actual)
    if problems:
        saved = f"{run_dir}/tokenizer" if run_dir is not None else "RUN_DIR/tokenizer"
        raise TunelabError(
            "the chat template or EOS token differs from the one the adapter was trained with: " + "; ".join(problems),
            fix=f"load the tokenizer saved in {saved}, or retrain with this template",
            where=where,
        )


def check_run_tokenizer(run_dir: Path, actual: PreTrainedTokenizerBase, where: str | None = None) -> None:
    """`check_chat_template` against the tokenizer a run (or registry version) saved beside its adapter."""
    from transformers import AutoTokenizer

    folder = Path(run_dir) / "tokenizer"
    if not folder.is_dir():
        raise TunelabError(
            f"{run_dir} has no tokenizer/ folder, so its chat template cannot be checked",
            fix="pass a run directory written by `tunelab train` (it saves the tokenizer beside the adapter)",
        )
    check_chat_template(AutoTokenizer.from_pretrained(folder), actual, where or str(run_dir), run_dir=Path(run_dir))


def tokenizer_identity(folder: Path) -> dict[str, str | None]:
    """What the registry records of a saved tokenizer: hashes of the template and EOS as saved, and the canary.

    The file hashes say "same bytes"; `canary_sha256` says "formats chats the same", which
    survives re-saving with another transformers version (template moved, JSON re-indented).
    """
    from transformers import AutoTokenizer

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise TunelabError(f"the saved tokenizer does not load: {exc}", where=str(folder),
                           fix="restore the run's tokenizer/ folder, or pass a run from `tunelab train`") from None
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos  # older files store an AddedToken dict
    jinja = folder / "chat_template.jinja"  # transformers >= 4.43 saves it here, older ones inside the config
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
    if template is not None and not isinstance(template, str):  # a list of named templates
        template = json.dumps(template, sort_keys=True)
    vocab = folder / "tokenizer.json"
    return {
        "chat_template_sha256": None if template is None else sha(template),
        "eos_token": eos,
        "eos_token_sha256": None if eos is None else sha(eos),
        "tokenizer_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest() if vocab.is_file() else None,
        "canary_sha256": template_fingerprint(tokenizer),
    }
