"""Measurements of this machine that decide a choice, kept so the same machine decides the same way.

    ratio, when = remembered("train_bf16_speedup", detect_hardware().identity(), measure)

A choice made from a timing (bf16 or fp32 for training) must not flip between two runs on one machine
because the second run's probe met a busy moment: a resumed run, or a run repeated to compare, would
then compute differently. So the first measurement is kept in `$TUNELAB_HOME/measured.json`, under a key
naming everything that changes the answer: the CPU model, its extensions, torch's dispatch level, the
oneDNN ISA limit, and torch's version. Delete the file (or the entry) to measure again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tunelab.io import tunelab_home, write_json_atomic

MEASURED_FILE = "measured.json"


def measurement_key(name: str, machine: str) -> str:
    return f"{name} | {machine}"


def remembered(name: str, machine: str, measure: Callable[[], float],
               path: Path | None = None) -> tuple[float, str]:
    """The stored figure for `name` on this machine, else `measure()` now (and stored).
    Returns (figure, where it came from: 'measured now' or 'measured earlier, kept in PATH')."""
    path = path or tunelab_home() / MEASURED_FILE
    key = measurement_key(name, machine)
    stored = _read(path)
    if isinstance(stored.get(key), (int, float)):
        return float(stored[key]), f"measured earlier, kept in {path}"
    value = float(measure())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**_read(path), key: round(value, 4)})  # re-read: another process may have added one
    except OSError:
        pass  # a read-only home: the choice is still made, only not kept
    return value, "measured now"


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent, or not ours to trust: measure again and write a whole new file
    return data if isinstance(data, dict) else {}
