"""Property tests: `validate` never raises on bad data, whatever the bytes or JSON values, in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunelab.data.findings import KINDS  # noqa: E402
from tunelab.data.formats import FORMATS  # noqa: E402
from tunelab.data.validate import validate_bytes  # noqa: E402

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
KEYS = ["messages", "role", "content", "weight", "prompt", "completion", "instruction", "input", "output",
        "conversations", "from", "value", "system", "preferred_output", "non_preferred_output", "chosen", "rejected",
        "text", "label"]
WORDS = ["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "", " ", "hi"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(WORDS)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)
# Bytes that look like our files: JSON punctuation, keys, line ends, bad UTF-8, byte-order marks, CSV quoting.
tokens = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\r\n", b" ", b"\t", b"1", b"null",
                          b'"messages"', b'"role"', b'"content"', b'"user"', b'"assistant"', b'"instruction"',
                          b'"output"', b"\xff", b"\xe9", b"\xc3", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"text,label",
                          b"\xe2\x80\xa8", b'""'])


def check(data: bytes) -> None:
    lines = data.count(b"\n") + 1
    for suffix in SUFFIXES:
        for fmt in FORMATS:
            report = validate_bytes(data, Path(f"data{suffix}"), fmt)  # must not raise
            for finding in report.findings:
                assert finding.kind in KINDS
                assert finding.line is None or 1 <= finding.line <= lines
                assert "\n" not in finding.render(report.path)
            assert report.examples <= report.rows
            assert bool(report.errors) or report.examples == report.rows  # no silent drops
            json.dumps(report.to_json())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_never_raises_on_arbitrary_bytes(data):
    check(data)


@settings(max_examples=150, deadline=None)
@given(st.lists(tokens, max_size=40).map(b"".join))
def test_never_raises_on_json_like_bytes(data):
    check(data)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, max_size=6))
def test_never_raises_on_arbitrary_json_values_per_line(values):
    check("".join(json.dumps(v) + "\n" for v in values).encode())
    check((json.dumps(values) + "\n").encode())  # the same values as one JSON array
