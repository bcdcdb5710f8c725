"""Where the service keeps bytes, and what happens to an upload.

    STORAGE/                      ServeConfig.storage, default $TUNELAB_HOME/service
      service.sqlite              the tables (unless --db names another database)
      files/file-...              an upload or a result file, named by its id, never by the client's filename
      runs/ftjob-.../             a job's output_dir: its run directory, worker.log, .lock

An upload is streamed to a temporary name under files/ and renamed to its id once whole and under the
size limit, so no half-written file ever carries an id. A `fine-tune` file is then processed: tunelab's
validator (data/validate.py) reads every line and the report is kept with the file; its status becomes
`processed`, or `error` with the first problem and the count in `status_details`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.validate import Report, validate_bytes
from tunelab.io import tunelab_home

FILE_ID_RE = re.compile(r"file-[A-Za-z0-9]{24}")
JOB_ID_RE = re.compile(r"ftjob-[A-Za-z0-9]{24}")
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
RESULTS_PURPOSE = "fine-tune-results"


class TooLarge(Exception):
    pass


@dataclass(frozen=True)
class Storage:
    root: Path

    @classmethod
    def at(cls, root: Path | None) -> Storage:
        storage = cls(Path(root) if root is not None else tunelab_home() / "service")
        (storage.root / "files").mkdir(parents=True, exist_ok=True)
        (storage.root / "runs").mkdir(parents=True, exist_ok=True)
        return storage

    @property
    def default_db(self) -> str:
        return f"sqlite:///{(self.root / 'service.sqlite').resolve()}"

    def file(self, file_id: str) -> Path:
        """The path of a stored file; only ids the store made reach here, checked again so no name becomes a path."""
        if not FILE_ID_RE.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / "files" / file_id

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "runs" / job_id

    def temporary(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=self.root / "files")
        return fd, Path(name)


async def save_stream(chunks: AsyncIterator[bytes], storage: Storage, limit: int) -> tuple[Path, int]:
    """Write chunks to a temporary file under files/; TooLarge (and nothing left behind) past `limit` bytes."""
    fd, tmp = storage.temporary()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(size)
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size


def validation_report(path: Path, filename: str) -> Report:
    """tunelab's validator over a stored file; findings name the client's filename and the line."""
    return validate_bytes(path.read_bytes(), Path(filename))


def processing_outcome(report: Report) -> tuple[str, str | None, dict[str, Any]]:
    """(status, status_details, the report as JSON) for a validated training file."""
    summary = report.to_json()
    errors = report.errors
    if not errors:
        return "processed", None, summary
    first = errors[0]
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return "error", f"{first.where(report.path)}: {first.message}{more}", summary
