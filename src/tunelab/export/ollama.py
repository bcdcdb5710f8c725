'''An Ollama Modelfile generated from the chat template the adapter was trained with.

    fmt = turn_format(tokenizer)              # how the Jinja template lays out one message, learned by rendering it
    text = modelfile(fmt, "model-Q8_0.gguf")   # FROM, TEMPLATE over .Messages, SYSTEM, PARAMETER stop

No hand-kept table of model families (Unsloth's approach): the template is rendered with marker strings as
message contents, and the text between them gives the layout of one message, `prefix + header(role) +
content + footer`, plus the text before the first message, the generation prompt and the default system
prompt that the template adds when a conversation has none. For SmolLM2's ChatML:

    before ''   header '<|im_start|>' ROLE '\\n'   footer '<|im_end|>\\n'   generation '<|im_start|>assistant\\n'
    default system 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'

    TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}
    {{ .Content }}<|im_end|>
    {{ end }}<|im_start|>assistant
    """
    SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
    PARAMETER stop "<|im_end|>"
    PARAMETER stop "<|im_start|>"

The default system prompt goes to SYSTEM, which Ollama puts first in .Messages when a request has no system
message (gotemplate.py), so the template need not print it. There is no ADAPTER line: Ollama 0.34.1 and later
refuse them ("LoRA adapters are no longer supported"), so the Modelfile points at a merged GGUF. A template
that does not fit this layout (roles renamed, per-role turns) is refused with a clear message; verify.py
renders the Modelfile's TEMPLATE as Ollama does and compares it with the Jinja template byte for byte.
'''

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError
from tunelab.export.record import Check

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_S, _U, _A, _V = "\x01tunelab-system\x01", "\x01tunelab-user\x01", "\x01tunelab-assistant\x01", "\x01tunelab-user-2\x01"
FIX = ("use --to gguf and write the Modelfile's TEMPLATE by hand, or let Ollama use the GGUF's own chat template "
       "(a Modelfile with only FROM and PARAMETER stop)")


@dataclass(frozen=True)
class TurnFormat:
    before: str  # text before the first message (a BOS token, or nothing)
    header_start: str  # before the role name
    header_end: str  # between the role name and the content
    footer: str  # after the content (the end-of-turn token and a newline)
    generation: str  # the generation prompt (add_generation_prompt=True)
    default_system: str | None  # what the template adds as system content when a conversation has none
    stops: tuple[str, ...]  # special tokens of the footer (end of turn), then of the header (turn start)

    def go_template(self) -> str:
        return (f"{_go_text(self.before)}{{{{ range .Messages }}}}{_go_text(self.header_start)}{{{{ .Role }}}}"
                f"{_go_text(self.header_end)}{{{{ .Content }}}}{_go_text(self.footer)}{{{{ end }}}}"
                f"{_go_text(self.generation)}")


def _go_text(text: str) -> str:
    """Literal text inside a Go template: `{{` must be written as an action printing it."""
    return text.replace("{{", '{{ "{{" }}')


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[tuple[str, str]], generation: bool) -> str:
    return str(tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=generation))


def _between(text: str, markers: list[str]) -> list[str]:
    """The text before, between and after `markers`, each of which must occur once, in order."""
    parts, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise ValueError(f"the template shows a message content {rest.count(marker)} times")
        head, rest = rest.split(marker)
        parts.append(head)
    return [*parts, rest]


def turn_format(tokenizer: PreTrainedTokenizerBase, where: str) -> TurnFormat:
    """The layout of one message under `tokenizer`'s chat template, or a TunelabError saying why it has none."""
    try:
        conv = [("system", _S), ("user", _U), ("assistant", _A), ("user", _V)]
        p0, p1, p2, p3, p4 = _between(_render(tokenizer, conv, True), [_S, _U, _A, _V])
        footer = _between(_render(tokenizer, conv, False), [_S, _U, _A, _V])[-1]
        generation = p4.removeprefix(footer)
        if not p4.startswith(footer) or p1 != p3 or not (p1.startswith(footer) and p2.startswith(footer)):
            raise ValueError("the text between messages depends on their position")
        user_header, assistant_header = p1[len(footer):], p2[len(footer):]
        if "user" not in user_header or "assistant" not in assistant_header:
            raise ValueError("the role names are not printed as they are")
        header_start = user_header[:user_header.index("user")]
        header_end = user_header[len(header_start) + len("user"):]
        if assistant_header != f"{header_start}assistant{header_end}":
            raise ValueError("the user and assistant headers differ beyond the role name")
        system_header = f"{header_start}system{header_end}"
        if not p0.endswith(system_header):
            raise ValueError("the system message has a header of its own")
        before = p0[: len(p0) - len(system_header)]
        alone = _render(tokenizer, [("user", _U)], True)
        plain = f"{before}{header_start}user{header_end}{_U}{footer}{generation}"
        default_system = None
        if alone != plain:
            lead = f"{before}{system_header}"
            tail = f"{footer}{header_start}user{header_end}{_U}{footer}{generation}"
            if not (alone.startswith(lead) and alone.endswith(tail)):
                raise ValueError("a conversation without a system message is laid out differently")
            default_system = alone[len(lead): len(alone) - len(tail)]
    except ValueError as exc:
        raise TunelabError(f"cannot write an Ollama TEMPLATE from this chat template: {exc}", where=where,
                           fix=FIX) from None
    except Exception as exc:  # noqa: BLE001 - jinja2 errors: the template refused a system turn, ...
        raise TunelabError(f"cannot write an Ollama TEMPLATE: the chat template failed on a system, user, assistant, "
                           f"user conversation ({type(exc).__name__}: {exc})", where=where, fix=FIX) from None
    specials = [t for t in tokenizer.all_special_tokens if t]
    stops = [t for t in specials if t in footer] + [t for t in specials if t in header_start]
    return TurnFormat(before, header_start, header_end, footer, generation, default_system,
                      tuple(dict.fromkeys(stops)))


def modelfile(fmt: TurnFormat, gguf_file: str, origin: str) -> str:
    """The Modelfile text: FROM the merged GGUF beside it, the TEMPLATE, SYSTEM and stop parameters."""
    template = fmt.go_template()
    for name, text in (("TEMPLATE", template), ("SYSTEM", fmt.default_system or "")):
        if '"""' in text:
            raise TunelabError(f'the {name} would contain """, which ends a Modelfile string', where=origin, fix=FIX)
    lines = [f"# Written by `tunelab export` from {origin}: TEMPLATE, SYSTEM and stop come from the chat template",
             "# the adapter was trained with. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    if fmt.default_system:
        lines.append(f'SYSTEM """{fmt.default_system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """{instruction: [values]} of a Modelfile tunelab wrote (triple-quoted or plain values; comments skipped)."""
    out: dict[str, list[str]] = {}
    rest = text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            rest = after
            continue
        name, _, value = line.partition(" ")
        if value.startswith('"""'):
            body, _, rest = (value[3:] + "\n" + after).partition('"""')
            rest = rest.partition("\n")[2]
            out.setdefault(name.upper(), []).append(body)
            continue
        out.setdefault(name.upper(), []).append(value)
        rest = after
    return out


# Conversations the Modelfile must render exactly as the Jinja template does: without and with a system
# message, several turns, and contents that look like template syntax or hold blank lines.
CHECK_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Where is my card?"),),
    (("system", "Answer in one word."), ("user", "Where is my card?")),
    (("user", "hi"), ("assistant", "card_arrival"), ("user", "and {{ .Role }} the rate?\n\nthanks")),
    (("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c")),
)


def modelfile_check(text: str, tokenizer: PreTrainedTokenizerBase) -> Check:
    """Render the Modelfile's TEMPLATE as Ollama does (Go itself when installed) against apply_chat_template."""
    import json
    import subprocess

    from tunelab.export.gotemplate import go_available, ollama_values, render_go, render_python

    parsed = parse_modelfile(text)
    template = parsed["TEMPLATE"][0]
    system = parsed.get("SYSTEM", [None])[0]
    stops = [json.loads(v.removeprefix("stop").strip()) for v in parsed.get("PARAMETER", []) if v.startswith("stop ")]
    expected = [_render(tokenizer, list(c), True) for c in CHECK_CONVERSATIONS]
    values = [ollama_values([{"role": r, "content": t} for r, t in c], system) for c in CHECK_CONVERSATIONS]
    renderer = "python (Go subset)"
    got = None
    if go_available():
        try:
            got, renderer = render_go(template, values), "go text/template"
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            got = None
    if got is None:
        got = [render_python(template, v) for v in values]
    identical = sum(a == b for a, b in zip(expected, got))
    single = [s for s in stops if len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1]
    first_bad = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    passed = (identical == len(expected) and len(single) == len(stops) and tokenizer.eos_token in stops
              and "ADAPTER" not in parsed)
    figures = {"renderer": renderer, "identical": f"{identical}/{len(expected)}", "stops": ", ".join(stops),
               "eos_is_a_stop": tokenizer.eos_token in stops, "adapter_line": "ADAPTER" in parsed}
    if first_bad is not None:
        figures["first_difference"] = f"expected {expected[first_bad][:80]!r}, got {got[first_bad][:80]!r}"
    return Check(name="modelfile", passed=passed, figures=figures,
                 detail="TEMPLATE rendered the way Ollama runs it vs apply_chat_template(add_generation_prompt=True), "
                        "byte for byte, with and without a system message; every stop is one token, eos among them")
