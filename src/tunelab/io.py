"""Files without half-writes, their hashes, and where tunelab keeps things. No torch: the registry and the
CLI's fast paths import this.

Every file tunelab writes goes to a temporary name in the same folder and is renamed into place, so a
reader (or a crash) never sees half of it:

    write_json_atomic(run / "eval.json", obj)          # a JSON file
    write_text_atomic(run / "report.md", text)         # a text file
    with staged_dir(run / "adapter") as tmp:           # a folder: filled in `tmp`, renamed to run/adapter
        model.save_pretrained(tmp)                     #   when the block ends without an error

Where things live: `tunelab_home()` ($TUNELAB_HOME, default ~/.cache/tunelab) holds converted base models
(`models/`) and, unless $TUNELAB_REGISTRY says otherwise, the registry (`registry/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # a run directory's last write: its presence means the run is whole (rundir.py)


def tunelab_home() -> Path:
    """$TUNELAB_HOME, else ~/.cache/tunelab: converted base models and the default registry."""
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab")


def registry_root() -> Path:
    """$TUNELAB_REGISTRY, else $TUNELAB_HOME/registry."""
    explicit = os.environ.get("TUNELAB_REGISTRY")
    return Path(explicit).expanduser() if explicit else tunelab_home() / "registry"


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place; returns `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`text` as UTF-8, written atomically (`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> Path:
    """`obj` as indented JSON (values it cannot encode, like paths, as strings), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final`, renamed to `final` (replacing it) when the block ends without an
    error, and removed when it raises."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

