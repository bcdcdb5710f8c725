"""Render an Ollama TEMPLATE (Go text/template) the way Ollama does, to compare it with the Jinja chat template.

    values = ollama_values(messages, default_system="You are ...")   # what Ollama passes the template
    text = render_go_template(template, values)                       # with Go itself when `go` is installed
    text = render_python(template, values)                            # else this faithful subset

What Ollama passes (ollama `server/routes.go` ChatHandler and `template/template.go` Execute): when the
first message is not a system message, the Modelfile's SYSTEM is put before the messages as one; then
`collate` joins consecutive messages of one role with a blank line, and the template runs with `.Messages`
(Role, Content), `.System` (every system message's content, blank-line joined) and an empty `.Response`.

No Python package renders Go templates, so `render_python` implements the subset tunelab's Modelfiles and
Ollama's own chat templates use: text, `{{ .Field }}` (also `.Messages`' `.Role` / `.Content` inside
`range`), string literals, `if` / `else if` / `else` / `end` on a field or `eq A B`, `range`, and the
`{{-` / `-}}` trim markers. Anything else raises ValueError instead of rendering something else. The tests
compare it with Go's own output (`go run`, skipped where Go is not installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|[^\s()]+')


def ollama_values(messages: list[dict[str, str]], default_system: str | None) -> dict[str, Any]:
    """The values Ollama's chat endpoint hands the template for `messages` under a Modelfile with SYSTEM."""
    msgs = [dict(m) for m in messages]
    if default_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": default_system})
    system = [m["content"] for m in msgs if m["role"] == "system"]
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": collated, "Response": "", "Prompt": ""}


# ---- the Python rendering -------------------------------------------------------------------------------


def _parse(template: str) -> list:
    """Template -> a tree: str (text) | ("field", path) | ("lit", str) | ("if", [(cond, body)], else_body)
    | ("range", pipe, body). Trim markers are applied to the neighbouring text here, as Go's lexer does."""
    pieces: list = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", m.group(2).strip(), bool(m.group(3))))
        pos = m.end()
    pieces.append(("text", template[pos:]))
    # A right trim marker strips the whitespace that starts the next text.
    for i, piece in enumerate(pieces):
        if piece[0] == "action" and piece[2] and i + 1 < len(pieces):
            pieces[i + 1] = ("text", pieces[i + 1][1].lstrip(" \t\r\n"))
    tree, rest = _block(pieces, 0)
    if rest != len(pieces):
        raise ValueError("unexpected {{ end }} or {{ else }}")
    return tree


def _block(pieces: list, i: int) -> tuple[list, int]:
    out: list = []
    while i < len(pieces):
        kind, body = pieces[i][0], pieces[i][1]
        if kind == "text":
            if body:
                out.append(body)
            i += 1
            continue
        words = _TOKEN.findall(body)
        head = words[0] if words else ""
        if head in ("end", "else"):
            return out, i
        if head == "if":
            branches, otherwise = [], []
            cond = words[1:]
            while True:
                inner, i = _block(pieces, i + 1)
                branches.append((cond, inner))
                if i >= len(pieces):
                    raise ValueError("{{ if }} without {{ end }}")
                words = _TOKEN.findall(pieces[i][1])
                if words[:2] == ["else", "if"]:
                    cond = words[2:]
                    continue
                if words == ["else"]:
                    otherwise, i = _block(pieces, i + 1)
                    words = _TOKEN.findall(pieces[i][1]) if i < len(pieces) else []
                if words != ["end"]:
                    raise ValueError("{{ if }} without {{ end }}")
                break
            out.append(("if", branches, otherwise))
            i += 1
        elif head == "range":
            inner, i = _block(pieces, i + 1)
            if i >= len(pieces) or _TOKEN.findall(pieces[i][1]) != ["end"]:
                raise ValueError("{{ range }} without {{ end }} (else in range is not supported)")
            out.append(("range", words[1:], inner))
            i += 1
        elif head.startswith("/*"):
            i += 1  # a comment
        else:
            out.append(("pipe", words))
            i += 1
    return out, i


def _value(words: list[str], dot: Any, root: dict) -> Any:
    if not words:
        raise ValueError("empty action")
    if words[0] == "eq":
        args = [_value([w], dot, root) for w in words[1:]]
        return any(args[0] == a for a in args[1:])
    if words[0] == "not" and len(words) == 2:
        return not _truth(_value(words[1:], dot, root))
    if len(words) != 1:
        raise ValueError(f"unsupported pipeline {' '.join(words)!r}")
    word = words[0]
    if word.startswith('"'):
        return json.loads(word)  # Go's interpreted strings share JSON's escapes for the cases used here
    if word.startswith("`"):
        return word[1:-1]
    if word == ".":
        return dot
    if word.startswith("$."):
        return _field(root, word[2:])
    if word.startswith("."):
        return _field(dot, word[1:])
    raise ValueError(f"unsupported value {word!r}")


def _field(obj: Any, path: str) -> Any:
    for name in path.split("."):
        if not isinstance(obj, dict) or name not in obj:
            raise ValueError(f"no field {name!r}")
        obj = obj[name]
    return obj


def _truth(value: Any) -> bool:
    return bool(value)  # Go: false, 0, nil, and empty strings, slices and maps are false


def _run(tree: list, dot: Any, root: dict, out: list[str]) -> None:
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "pipe":
            value = _value(node[1], dot, root)
            out.append(value if isinstance(value, str) else str(value))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(_value(cond, dot, root)):
                    _run(body, dot, root, out)
                    break
            else:
                _run(node[2], dot, root, out)
        elif node[0] == "range":
            for item in _value(node[1], dot, root) or []:
                _run(node[2], item, root, out)


def render_python(template: str, values: dict[str, Any]) -> str:
    out: list[str] = []
    _run(_parse(template), values, values, out)
    return "".join(out)


# ---- Go itself -------------------------------------------------------------------------------------------

_GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	System   string
	Messages []Message
	Response string
	Prompt   string
}

func main() {
	var in struct {
		Template string
		Cases    []Values
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	out := []string{}
	for _, v := range in.Cases {
		var b []byte
		w := &buf{&b}
		if err := tmpl.Execute(w, v); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buf struct{ b *[]byte }

func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


def go_available() -> bool:
    return shutil.which("go") is not None


def render_go(template: str, cases: list[dict[str, Any]], timeout: float = 120.0) -> list[str]:
    """Every case rendered by Go's text/template (one `go run`); raises RuntimeError when Go fails."""
    with tempfile.TemporaryDirectory(prefix="tunelab-gotmpl-") as tmp:
        program = Path(tmp) / "main.go"
        program.write_text(_GO_PROGRAM, encoding="utf-8")
        proc = subprocess.run(["go", "run", str(program)], input=json.dumps({"Template": template, "Cases": cases}),
                              capture_output=True, text=True, timeout=timeout, cwd=tmp, env=_go_env(tmp))
        if proc.returncode != 0:
            raise RuntimeError(f"go run failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)


def _go_env(tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "tunelab-gocache"))
    env.setdefault("GOPATH", str(Path(tmp) / "gopath"))
    env["GO111MODULE"] = "off"  # one stdlib-only file: no module, no proxy
    return env
