"""export.json: what was exported, from what, in which form, the hash of every file, and the verification.

    {"format": "tunelab-export/1", "target": "gguf", "source": {"run_dir": ..., "registry": "banking@3", ...},
     "base": {"spec": "smollm2-135m-instruct", "gguf": ".../SmolLM2-135M-Instruct.Q4_1.gguf", ...},
     "quant": "q8_0", "files": {"banking.gguf": {"bytes": ..., "sha256": ...}},
     "verified": true, "checks": [{"name": "merge", "passed": true, "figures": {"max_abs_logit_diff": 3e-6, ...}}],
     "tokenization": {"agrees": true, ...}, "warnings": []}

`tunelab.export(...)` returns this model; the CLI prints its checks as the verification table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import TunelabError, first_problem
from tunelab.io import file_sha256, write_json_atomic

EXPORT_FORMAT = "tunelab-export/1"
Figure = float | int | bool | str | None


class _Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceRecord(_Typed):
    run_dir: str  # the run (or registry version) folder the adapter was read from
    registry: str | None = None  # NAME@VERSION when exported from the registry
    requested: str  # what the user passed (a path, NAME, NAME@3, NAME@production)
    tuning: str  # lora | full
    method: str  # lora, rslora, dora, full; "+int8"/"+nf4" for a quantized base
    lora_rank: int | None = None
    lora_alpha: float | None = None


class BaseRecord(_Typed):
    spec: str  # the run's model.name
    path: str  # the HF folder it resolves to
    weights: str  # fingerprint (the run's data.json records the same)
    gguf: str | None = None  # the base's own GGUF (bundled or given), whose metadata a GGUF export copies


class FileRecord(_Typed):
    bytes: int
    sha256: str


class Check(_Typed):
    """One verification: its figures, and whether they are within what `ExportConfig` allows."""

    name: str  # merge | non-vacuity | gguf-logits | gguf-metadata | adapter-delta | tokenization | modelfile | ...
    passed: bool
    figures: dict[str, Figure] = Field(default_factory=dict)
    detail: str = ""  # one sentence: what was compared, and against what limit


class TokenizationRecord(_Typed):
    """tunelab's tokenizer against what the GGUF metadata makes llama.cpp do (its pre-tokenizer + the BPE merges)."""

    pre_tokenizer: str  # tokenizer.ggml.pre
    texts: int
    agrees: bool
    first_difference: str | None = None  # the first text that differs, with both token lists


class ExportRecord(_Typed):
    format: Literal["tunelab-export/1"] = EXPORT_FORMAT
    target: Literal["hf", "gguf", "gguf-adapter", "ollama"]
    path: str
    source: SourceRecord
    base: BaseRecord
    dtype: str | None = None  # hf: the saved weights' dtype
    quant: str | None = None  # gguf, ollama: the matrices' GGUF type (q8_0, f16, ...)
    tensor_types: dict[str, int] = Field(default_factory=dict)  # GGUF type -> tensors written in it
    files: dict[str, FileRecord] = Field(default_factory=dict)  # relative to `path` (or its folder, for a file)
    verified: bool  # False: --no-verify, the checks were not computed
    checks: list[Check] = Field(default_factory=list)
    tokenization: TokenizationRecord | None = None
    warnings: list[str] = Field(default_factory=list)
    tunelab_version: str
    seconds: float = 0.0

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path) -> ExportRecord:
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TunelabError(f"not a tunelab export record: {first_problem(exc)}", where=str(path),
                               fix="pass the export.json written by `tunelab export`") from None


def file_records(root: Path, files: list[Path]) -> dict[str, FileRecord]:
    """{path relative to `root`: size and sha256} for every exported file."""
    return {f.relative_to(root).as_posix(): FileRecord(bytes=f.stat().st_size, sha256=file_sha256(f))
            for f in sorted(files)}
