"""A fine-tuning job: OpenAI's create request -> a tunelab RunConfig, and the job, event and checkpoint objects.

    POST /v1/fine_tuning/jobs
    {"model": "smollm2-135m-instruct", "training_file": "file-...", "suffix": "support", "seed": 7,
     "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": 8,
                                                                        "learning_rate_multiplier": 2}}},
     "metadata": {"team": "support"},
     "tunelab": {"lora": {"rank": 8}, "train": {"checkpoint_every": 20}}}       <- extra_body, RunConfig keys

becomes the RunConfig `tunelab train` would read from

    model: smollm2-135m-instruct
    data: {path: STORAGE/files/file-..., format: auto}
    lora: {rank: 8}
    train: {epochs: auto, batch_size: 8, learning_rate: auto, learning_rate_multiplier: 2, seed: 7, checkpoint_every: 20}
    output_dir: STORAGE/runs/ftjob-...

The hyperparameters are echoed as given ("auto" included) until training resolves them; the job then
shows the numbers the run used (its config.json). Anything of tunelab's own config goes under
`tunelab` and is checked by the same typed config as a YAML file: an unknown key is a 400 naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tunelab.config import RunConfig, parse_config
from tunelab.errors import TunelabError
from tunelab.service.store import Checkpoint, Job, JobEvent

JOB_PREFIX = "ftjob-"
# The parts of a RunConfig the API itself sets: given under `tunelab`, they are a 400 naming the API field.
API_OWNED = {"model.name": "model", "data.path": "training_file", "output_dir": "(the server's storage)",
             "name": "suffix", "objective": "method.type", "train.seed": "seed", "train.epochs": "n_epochs",
             "train.batch_size": "batch_size", "train.learning_rate_multiplier": "learning_rate_multiplier",
             "dpo.beta": "method.dpo.hyperparameters.beta"}

Auto = Literal["auto"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Open):
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] | None = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] | None = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] | None = "auto"

    def shown(self) -> dict[str, Any]:
        return {k: ("auto" if v is None else v) for k, v in self.model_dump().items()}


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] | None = "auto"


class Supervised(_Open):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Dpo(_Open):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")  # `reinforcement` and future types: refused by name below
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @field_validator("type")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value == "reinforcement":
            raise ValueError("reinforcement fine-tuning is not supported by this server; use 'supervised' "
                             "(LoRA on the answers) or 'dpo' (preference pairs)")
        return value


class CreateJobRequest(BaseModel):
    """OpenAI's CreateFineTuningJobRequest, in its order; then our extras (`tunelab`, `dry_run`)."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we ignore (`integrations` handled below)
    model: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    training_file: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI for `method`, still accepted
    integrations: list[Any] | None = None
    metadata: dict[str, Annotated[str, StringConstraints(max_length=512)]] | None = None
    method: Method | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    suffix: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    validation_file: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    # --- tunelab's own (extra_body)
    tunelab: dict[str, Any] | None = None
    dry_run: bool = False

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 for k in value)):
            raise ValueError("at most 16 keys of up to 64 characters")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it becomes part of the model's name)")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations (Weights & Biases) are not supported by this server; set "
                             "tunelab.train.report_to instead, or leave integrations out")
        return value

    def resolved_method(self) -> Method:
        """`method`, or the deprecated top-level `hyperparameters` as a supervised method."""
        if self.method is None:
            return Method(type="supervised", supervised=Supervised(hyperparameters=self.hyperparameters
                                                                   or Hyperparameters()))
        if self.method.type == "supervised" and self.method.supervised is None:
            return self.method.model_copy(update={"supervised": Supervised()})
        if self.method.type == "dpo" and self.method.dpo is None:
            return self.method.model_copy(update={"dpo": Dpo()})
        return self.method


def hyperparameters_of(method: dict[str, Any]) -> dict[str, Any]:
    return dict(method.get(method["type"], {}).get("hyperparameters", {}))


def check_tunelab_keys(extra: dict[str, Any]) -> None:
    """Refuse, by name, RunConfig keys the API sets itself."""
    if isinstance(extra.get("model"), str):
        raise TunelabError("tunelab.model is set by the API", fix="use the request's model instead "
                           "(tunelab.model may hold other model keys, e.g. {\"kernels\": \"reference\"})",
                           where="tunelab")
    for dotted, field in API_OWNED.items():
        node: Any = extra
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise TunelabError(f"tunelab.{dotted} is set by the API", fix=f"use the request's {field} instead",
                               where="tunelab")


def check_servable(cfg: RunConfig, max_lora_rank: int) -> None:
    """Refuse, before any training, a job whose model this server could not serve when it is done."""
    if cfg.tuning != "lora":
        raise TunelabError("tuning: full trains a whole model, which this server cannot serve beside its base",
                           fix="leave tunelab.tuning at lora", where="tunelab.tuning")
    if cfg.lora.use_dora:
        raise TunelabError("a DoRA adapter is not served by the multi-adapter engine", fix="leave "
                           "tunelab.lora.use_dora false", where="tunelab.lora.use_dora")
    if cfg.lora.rank > max_lora_rank:
        raise TunelabError(f"LoRA rank {cfg.lora.rank} is above this server's max_lora_rank {max_lora_rank}, so the "
                           "model could not be served", fix=f"set tunelab.lora.rank to {max_lora_rank} or less, or "
                           "start the server with --set max_lora_rank=N", where="tunelab.lora.rank")


def run_config(job: Job, data_path: Path, output_dir: Path, base_model: str, checkpoint_every: int) -> RunConfig:
    """The RunConfig a job trains with (its hyperparameters still "auto" where the request said so)."""
    method = job.method
    hp = hyperparameters_of(method)
    raw: dict[str, Any] = _deep_merge({"train": {"checkpoint_every": checkpoint_every}}, job.tunelab)
    raw["model"] = _merge_model(raw.get("model"), base_model)
    raw["data"] = {**raw.get("data", {}), "path": str(data_path), "format": "dpo" if method["type"] == "dpo"
                   else raw.get("data", {}).get("format", "auto")}
    raw["objective"] = "dpo" if method["type"] == "dpo" else "sft"
    train = raw.setdefault("train", {})
    train["seed"] = job.seed
    train["epochs"] = hp.get("n_epochs", "auto")
    train["batch_size"] = hp.get("batch_size", "auto")
    if hp.get("learning_rate_multiplier", "auto") != "auto":
        train["learning_rate_multiplier"] = hp["learning_rate_multiplier"]
    if method["type"] == "dpo" and hp.get("beta", "auto") != "auto":
        raw.setdefault("dpo", {})["beta"] = hp["beta"]
    raw["output_dir"] = str(output_dir)
    raw["name"] = job.id
    return parse_config(raw, where="tunelab")


def _merge_model(given: Any, base_model: str) -> dict[str, Any]:
    extra = given if isinstance(given, dict) else {}
    return {**extra, "name": base_model}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def model_name(base: str, project: str, suffix: str | None, job_id: str) -> str:
    """`ft:{base}:{project}:{suffix}:{job}`, OpenAI's pattern (`ft:gpt-4o-mini:org:suffix:abc123`); a base given
    as a path is named by its folder."""
    short = Path(base).name if "/" in base else base
    return f"ft:{short}:{project}:{suffix or ''}:{job_id.removeprefix(JOB_PREFIX)}"


# ---------------------------------------------------------------------------------------------------- objects
def job_object(job: Job, project: str, base: str) -> dict[str, Any]:
    """The full FineTuningJob, every field present (explicit nulls), as OpenAI's API reference orders it."""
    hp = hyperparameters_of(job.method)
    shown = {k: hp.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": shown,
        "model": job.model,
        "organization_id": job.project_id,
        "result_files": list(job.result_files or []),
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish,
        "integrations": None,
        "metadata": job.metadata_,
        "method": job.method,
        "user_provided_suffix": job.suffix,
    }


def event_id(event: JobEvent) -> str:
    return f"ftevent-{event.seq}"


def event_object(event: JobEvent) -> dict[str, Any]:
    return {"id": event_id(event), "object": "fine_tuning.job.event", "created_at": event.created_at,
            "level": event.level, "message": event.message, "data": event.data, "type": event.type}


def checkpoint_object(checkpoint: Checkpoint, checkpoint_model: str) -> dict[str, Any]:
    return {"id": checkpoint.id, "object": "fine_tuning.job.checkpoint", "created_at": checkpoint.created_at,
            "fine_tuned_model_checkpoint": checkpoint_model, "fine_tuning_job_id": checkpoint.job_id,
            "metrics": checkpoint.metrics, "step_number": checkpoint.step_number}
