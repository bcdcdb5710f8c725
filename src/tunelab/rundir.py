"""A run directory that describes itself, its typed files, and loading a run back.

    runs/banking77-20261122-101500/
      adapter/            adapter_config.json + adapter_model.safetensors (PEFT format) + README.md (PEFT's model card)
      model/              instead of adapter/ after full fine-tuning: an HF model folder (config + safetensors)
      tokenizer/          tokenizer.json, tokenizer_config.json, chat_template.jinja
      config.json         the resolved RunConfig (absolute paths, every default filled in, no 'auto' left)
      data.json           RunData: the data report, the base model's identity, why each hyperparameter, the template
      metrics.jsonl       one JSON object per optimizer step / validation
      checkpoints/        step-NNNNNNN/: weights, optimizer, scheduler, RNG (training/checkpoint.py); the last K kept
      eval.json           the held-out evaluation (evaluation/result.py: EvalResult); what the registry's gate reads
      evals/NAME/         other evaluations (`tunelab eval RUN --data FILE`): eval.json + report, one folder each
      report.html/.md     the held-out evaluation for people
      manifest.json       written last: every file with its size and sha256, the run's summary, the evaluations

Every file is written to a temporary name and renamed, and `manifest.json` comes last, so a directory
without a manifest is an unfinished run and is never loaded. `tunelab.train` writes the manifest when
training ends; evaluating rewrites it with the files and the summary it adds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import RunConfig
from tunelab.data.report import DataReport
from tunelab.errors import TunelabError, first_problem
from tunelab.io import MANIFEST, file_sha256, staged_dir, write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # torch, PEFT and transformers load only where a model does (`load_run`, `save_*`)
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HELD_OUT = "eval.json"  # the run's own held-out evaluation: what the gate and the report read
RUN_FORMAT = "tunelab-run/2"


class _Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelIdentity(_Typed):
    spec: str  # what the config named
    path: str  # the HF folder it resolved to
    weights: str  # a fingerprint of the weight files (the registry compares it)


class Hyperparameter(_Typed):
    value: float
    why: str
    source: Literal["config", "default", "auto"]


class Lengths(_Typed):
    tokens: list[int]  # per training example
    trained_tokens: list[int]


class ChatTemplateRecord(_Typed):
    renders: list[tuple[str, str]]  # (canary name, rendered text)
    eos_token: str | None
    fingerprint: str


class RunData(DataReport):
    """data.json: the data report, plus what the run was trained with."""

    base_model: BaseModelIdentity
    hyperparameters: dict[str, Hyperparameter]
    processes: int
    chat_template: ChatTemplateRecord  # checked on every load (model/template_canary.py)
    lengths: Lengths


class ContenderSummary(_Typed):
    value: float | None  # the primary metric
    ci: tuple[float, float] | None  # its 95% interval
    prompt_tokens: float
    ms_per_request: float
    loss: float | None


class ComparisonSummary(_Typed):
    delta: float
    p_value: float
    significant: bool


class ForgettingSummary(_Typed):
    probe_delta: float
    flagged: bool


class RunSummary(_Typed):
    """What `tunelab demo|train|eval` print (as a table, or with --json as this object)."""

    run_dir: str
    model: str
    tuning: str
    objective: str
    task: str | None
    metric: str | None
    test_rows: int
    contenders: dict[str, ContenderSummary] = Field(default_factory=dict)
    comparisons: dict[str, ComparisonSummary] = Field(default_factory=dict)
    forgetting: ForgettingSummary | None = None
    eval_seconds: float
    # Training (absent for `tunelab eval` of an earlier run)
    precision: str | None = None
    train_rows: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    trained_tokens_per_second: float | None = None
    validation_loss: float | None = None
    total_seconds: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class FileEntry(_Typed):
    bytes: int
    sha256: str


class Manifest(_Typed):
    format: Literal["tunelab-run/2"] = RUN_FORMAT
    files: dict[str, FileEntry]
    summary: RunSummary | None = None
    evaluations: dict[str, str] = Field(default_factory=dict)  # name -> eval.json path ("held-out" -> eval.json)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():  # two runs in the same second
            suffix += 1
            path = Path(output_dir) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.path / name, obj)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Appending a line is the one non-atomic write: a crash loses at most a partial last line.
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop logged steps past `after_step` (a resumed run redoes them), atomically."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = _parse(line)  # None for a partial last line left by a crash
            final_validation = record is not None and "val_loss" in record and "loss" not in record
            if record is not None and record.get("step", 0) <= after_step and not final_validation:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def save_trained(self, model: PeftModel | PreTrainedModel, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter (PEFT format) after LoRA, or the whole model (an HF folder, `model/`) after full tuning.

        `state_dict`: the whole weights when the model itself holds only shards (FSDP).
        """
        from peft import PeftModel

        if isinstance(model, PeftModel):
            with staged_dir(self.path / "adapter") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            with staged_dir(self.path / "model") as tmp:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)

    def save_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        with staged_dir(self.path / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)

    def manifest(self) -> Manifest | None:
        """The manifest, or None while the run is unfinished."""
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        return _read_typed(Manifest, path, f"tunelab train --resume {self.path}")

    def write_manifest(self, summary: RunSummary | None = None, evaluations: dict[str, str] | None = None) -> Manifest:
        """Last write of a run: lists every file, so its presence means the run is whole. Keeps the summary and
        the evaluations of the manifest it replaces unless given new ones."""
        previous = self.manifest()
        files = {
            str(p.relative_to(self.path)): FileEntry(bytes=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        manifest = Manifest(
            files=files, summary=summary or (previous.summary if previous else None),
            evaluations={**(previous.evaluations if previous else {}), **(evaluations or {})})
        self.write_json(MANIFEST, manifest.model_dump(mode="json"))
        return manifest

    def config(self) -> RunConfig:
        """The resolved config (resume needs only this: an unfinished run has it too)."""
        return _read_typed(RunConfig, self.path / "config.json", "pass a run directory written by `tunelab train`")

    def data(self) -> RunData:
        return _read_typed(RunData, self.path / "data.json", "pass a run directory written by `tunelab train`")


def _read_typed(model: type[BaseModel], path: Path, fix: str):
    """A run's JSON file parsed into its type, or a TunelabError naming the file, the field and what to do."""
    if not path.is_file():
        raise TunelabError(f"{path.name} is missing", where=str(path.parent), fix=fix)
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise TunelabError(f"{first_problem(exc)}: written by another tunelab version, or changed by hand",
                           where=str(path), fix=fix) from None


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def finished(run_dir: Path) -> RunDir:
    """A finished run directory (it has its manifest), or a TunelabError saying what it is instead."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TunelabError(f"{run_dir} is not a directory", fix="pass a run directory printed by `tunelab train`")
    if not (run_dir / MANIFEST).is_file():
        raise TunelabError(f"{run_dir} is not a finished run (no {MANIFEST}: still training, or it stopped)",
                           fix=f"finish it with `tunelab train --resume {run_dir}`, or pass a finished run")
    return RunDir(run_dir)


def load_run(
    run_dir: Path, dtype: torch.dtype | None = None
) -> tuple[PeftModel | PreTrainedModel, PreTrainedTokenizerBase, RunConfig]:
    """Base model + the run's adapter (or the fully tuned model) + the run's tokenizer, in eval mode.

    The chat template travels with the run: it is loaded from RUN_DIR/tokenizer, and the canary checks
    that it renders today exactly as it did in training. The kernels are the run's (`model.kernels`);
    `dtype`: the base's weights (default fp32).
    """
    import torch
    from transformers import AutoTokenizer

    from tunelab.model.load import load_adapter, load_model, load_weights, resolve_model
    from tunelab.model.quantize import quantize_base
    from tunelab.model.template_canary import check_recorded_template

    dtype = dtype or torch.float32
    run = finished(run_dir)
    cfg = run.config()
    tokenizer = AutoTokenizer.from_pretrained(run.path / "tokenizer")
    recorded = run.data().chat_template.model_dump()
    check_recorded_template(recorded, tokenizer, where=str(run.path / "tokenizer"), run_dir=run.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (run.path / "model").is_dir():  # full fine-tuning
        model = load_weights(run.path / "model", dtype, cfg.model.kernels)
    else:
        # The base as it was trained on: the adapter learned over the quantized weights (it also loads over
        # the unquantized base, with outputs off by the quantization error).
        base, _ = load_model(resolve_model(cfg.model.name), dtype=dtype, quantize=cfg.lora.quantize_base,
                             kernels=cfg.model.kernels)
        quantize_base(base, cfg.lora.quantize_base, dtype)
        model = load_adapter(base, run.path / "adapter", cfg.model.kernels)
    model.eval()
    return model, tokenizer, cfg
