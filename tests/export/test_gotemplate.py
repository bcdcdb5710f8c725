"""The Python rendering of Ollama's Go templates, against Go's own text/template where Go is installed."""

from __future__ import annotations

import pytest

from tunelab.export.gotemplate import go_available, ollama_values, render_go, render_python

CHATML = ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")
# Ollama's own templates use these: if .System, eq, else if, trim markers, literals, $ root access.
TEMPLATES = [
    CHATML,
    "{{- if .System }}<<SYS>>{{ .System }}<</SYS>>\n{{ end -}}\n  {{- range .Messages }}[{{ .Role }}] {{ .Content }}\n"
    "{{- end }}",
    '{{ range .Messages }}{{ if eq .Role "user" }}U: {{ .Content }}{{ else if eq .Role "system" }}S{{ else }}'
    "{{ .Role }}{{ end }}|{{ end }}",
    'A {{- " B " -}} C {{ `raw {{` }} {{ if not .Response }}none{{ end }}{{ range .Messages }}{{ $.System }}{{ end }}',
]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo\n"},
            {"role": "user", "content": "a"}, {"role": "user", "content": "{{ .Role }} b"}]


def test_ollama_values_put_the_default_system_first_and_join_same_role_turns():
    values = ollama_values(MESSAGES, "be brief")
    assert [m["Role"] for m in values["Messages"]] == ["system", "user", "assistant", "user"]
    assert values["Messages"][-1]["Content"] == "a\n\n{{ .Role }} b"
    assert values["System"] == "be brief"
    assert ollama_values([{"role": "system", "content": "own"}], "default")["System"] == "own"


def test_chatml_renders_as_expected():
    text = render_python(CHATML, ollama_values(MESSAGES[:1], "sys"))
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_actions_raise_instead_of_rendering_something_else():
    with pytest.raises(ValueError):
        render_python("{{ range .Messages }}{{ .Content | upper }}{{ end }}", ollama_values(MESSAGES, None))
    with pytest.raises(ValueError):
        render_python("{{ if .System }}x", ollama_values(MESSAGES, None))


@pytest.mark.skipif(not go_available(), reason="Go is not installed (apt-get install golang-go)")
@pytest.mark.parametrize("template", TEMPLATES)
def test_python_rendering_equals_go(template):
    cases = [ollama_values(MESSAGES, "sys"), ollama_values(MESSAGES, None), ollama_values(MESSAGES[:1], "")]
    assert [render_python(template, v) for v in cases] == render_go(template, cases)


def test_python_rendering_equals_recorded_go_outputs():
    """Go 1.19's text/template outputs for the templates above, recorded where Go was installed
    (fixtures/go_text_template.json), so machines without Go still check the Python rendering."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "fixtures" / "go_text_template.json").read_text(encoding="utf-8"))
    assert [r["template"] for r in recorded] == TEMPLATES
    for r in recorded:
        assert [render_python(r["template"], values) for values in r["cases"]] == r["go"]
