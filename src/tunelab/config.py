"""Typed configuration for every stage of a run: the only place defaults live.

A run is described by one `RunConfig`, usually read from YAML:

    model: smollm2-135m-instruct   # or {name: ..., kernels: reference}
    data:
      path: train.csv          # relative paths are relative to the YAML file
      input_column: text       # CSV: which columns hold the message and the answer
      output_column: category
    lora: {rank: 16}
    train: {epochs: auto, learning_rate: 1.0e-3}

Every key has a default here, and only here. `epochs`, `batch_size` and `learning_rate` default
to "auto" (as OpenAI's fine-tuning API does): the run log and `tunelab plan` say what was chosen
and why (training/auto.py). Unknown keys and bad values are errors that name the key and the allowed
values; `load_config` reports all of them at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import TunelabError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SPLIT = (0.8, 0.1, 0.1)  # train / validation / test fractions (data.split, `tunelab data split`)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Accepted data formats (tunelab/data/formats.py reads each one; `tunelab data validate` checks them):
#   chat_jsonl         OpenAI chat: {"messages": [{"role", "content", "weight"?}, ...]}
#   prompt_completion  {"prompt": ..., "completion": ...}: strings, or lists of messages
#   alpaca             {"instruction", "input"?, "output"}: a JSON array file or JSONL
#   sharegpt           {"conversations": [{"from": "human"|"gpt"|..., "value": ...}]}
#   csv                CSV/TSV with an input and an output column
#   dpo                OpenAI preference pairs: {"input": {"messages"}, "preferred_output", "non_preferred_output"}
#   chosen_rejected    preference pairs: {"prompt", "chosen", "rejected"}: strings, or lists of messages
#   auto               decided from the file suffix (.csv/.tsv) or the keys of the first rows
DataFormat = Literal["auto", "chat_jsonl", "prompt_completion", "alpaca", "sharegpt", "csv", "dpo", "chosen_rejected"]


class DataConfig(_Strict):
    """Where the examples come from and how they become conversations."""

    path: Path | None = Field(
        None, description="Data file: chat JSONL, prompt/completion, Alpaca, ShareGPT, preference pairs, or CSV/TSV. "
        "Required unless the records are passed in memory (tunelab.train(cfg, records=...)).")
    format: DataFormat = Field(
        "auto", description="How rows are read (see DataFormat above); 'auto' decides from the suffix (.csv/.tsv) or "
        "the keys of the first rows, and the run log says what it found.",
    )
    input_column: str = Field("text", description="CSV: column holding the user message.")
    output_column: str = Field("label", description="CSV: column holding the assistant answer.")
    system_prompt: str | None = Field(
        None, description="System message put before every example (CSV), or before those without one (JSONL)."
    )
    split: tuple[float, float, float] = Field(DEFAULT_SPLIT, description="Train / validation / test fractions; must sum to 1.")
    max_train_rows: int | None = Field(
        None, ge=1, description="Use at most this many training rows (a fixed, hash-ordered subset); None = all."
    )
    max_length: int = Field(
        512, ge=8, description="Longest example in tokens after the chat template; longer ones are dropped and counted."
    )

    @model_validator(mode="after")
    def _split_sums_to_one(self) -> "DataConfig":
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"split fractions {self.split} must be >= 0 and sum to 1, e.g. [0.8, 0.1, 0.1]")
        return self


class LoraConfig(_Strict):
    """The LoRA adapter (PEFT). Weights of the base model stay frozen."""

    rank: int = Field(16, ge=1, description="LoRA rank r: width of the low-rank update.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 is best for short runs.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )
    top_layers: int | None = Field(
        None, ge=1, description="Adapt only the last N decoder layers (PEFT's layers_to_transform). Backward then "
        "stops at the lowest adapted layer, so a step does less work (SmolLM2, 10 of 30 layers: 1.5x in fp32); "
        "what it costs in accuracy is measured in docs/benchmarks.md. None = every layer."
    )
    use_dora: bool = Field(False, description="DoRA: learn a magnitude per output and a LoRA direction (PEFT).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank (PEFT).")
    quantize_base: Literal["none", "int8", "w8a8", "nf4"] = Field(
        "none",
        description="Quantize the frozen base (QLoRA-style): 'int8' = int8 weights, one scale per row (built in, "
        "CPU and CUDA); 'w8a8' = the same weights with the products in int8 too (activations and gradients "
        "quantized per row; faster where the CPU has int8 dot products, e.g. AVX512-VNNI; less exact); "
        "'nf4' = bitsandbytes 4-bit NormalFloat (needs the quant extra; CUDA, and CPU); "
        "'none' = keep the base in the compute dtype.",
    )


# `train.precision: auto` on a CPU: bf16 autocast when a training-sized product measures this much faster in bf16.
# Below it the rest of the step (norms, softmax, casts, the fp32 optimizer) eats the gain, and bf16 rounds.
TRAIN_BF16_MIN_SPEEDUP = 1.2


class TrainConfig(_Strict):
    """The optimisation: AdamW, linear warmup then cosine decay, accumulation."""

    epochs: float | Literal["auto"] = Field(
        "auto", description="Passes over the training rows (fractions allowed); 'auto': 3, fewer for many rows and "
        "more for few, so that rows x epochs lands in 3,000-25,000."
    )
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Examples per forward pass (micro-batch); 'auto' aims at ~1,024 tokens per micro-batch, "
        "capped by what fits in memory (tunelab/training/memory.py)."
    )
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float | Literal["auto"] = Field(
        "auto", description="Peak learning rate; 'auto': by method (LoRA ~10x a full fine-tune's), scaled with the "
        "batch (training/auto.py)."
    )
    learning_rate_multiplier: float = Field(
        1.0, gt=0, description="Times the learning rate, auto or given (OpenAI's hyperparameter of the same name)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up linearly.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; None = no clipping.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N optimizer steps; 0 = only at the end.")
    val_rows: int = Field(200, ge=0, description="Validation rows used for the validation loss (0 = none).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (and always at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep (the best is kept too).")
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many validations without improvement (needs eval_every); 0 = off."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest fall in validation loss that counts.")
    seed: int = Field(0, description="Seeds the adapter init, the data order and dropout.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where a training-sized matrix product measures at least "
        f"{TRAIN_BF16_MIN_SPEEDUP}x faster in bf16 on this CPU (once per CPU and torch version; AMX and AVX512-BF16 "
        "parts, not AVX2-only ones), or a GPU with bf16; else fp32. The run log states the figure "
        "(tunelab/model/precision.py)."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None = torch's default.")
    compile_kernels: bool = Field(
        True, description="Fuse each RMSNorm and gated-MLP activation with torch.compile (about 6 s once, at "
        "setup); where torch.compile cannot run, they stay eager and the run log says why."
    )
    compile_layers: bool | Literal["auto"] = Field(
        "auto", description="Compile each whole decoder layer (LoRA, attention, MLP) with torch.compile: faster "
        "steps for a compile of tens of seconds at setup. auto: on for LoRA SFT (bf16/fp32, int8 or NF4 base; not "
        "DoRA) of a Llama-family model in one process when the run trains on at least 300,000 tokens, where the "
        "time saved exceeds a cold compile; the run log says why it is on or off."
    )
    schedule: Literal["cosine", "linear"] = Field("cosine", description="Decay after warmup: cosine or linear, to 0.")
    packing: bool = Field(
        False,
        description="Padding-free packing: several examples per row, positions restart per example, "
        "attention never crosses an example boundary.",
    )
    pack_length: int | None = Field(
        None, ge=8, description="Most tokens per packed row (a longer example still gets a row as wide as "
        "itself); None = rows as wide as each micro-batch's longest example, the fastest on CPU, where a "
        "packed row's attention is dense over the whole row."
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Several processes: ddp replicates the model; fsdp shards weights, gradients and optimizer "
        "state per decoder layer (full fine-tuning only). auto: fsdp for full fine-tuning, ddp for adapters.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Also send the per-step metrics there (the package must be installed)."
    )
    time_budget_minutes: float | None = Field(
        None, gt=0, description="Minutes allowed for setup and training. Measured over the run's first steps, an "
        "estimate over it is said in the run log at once, with the data.max_train_rows that would fit; the run "
        "goes on (tunelab/training/budget.py). None = no budget."
    )


    @field_validator("epochs", "batch_size", "learning_rate")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if value != "auto" and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class DpoConfig(_Strict):
    """Direct preference optimisation (used when `objective: dpo`)."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (the base).")


class EvalConfig(_Strict):
    """Evaluation on held-out test rows: fine-tune vs the base model, same rows."""

    max_rows: int | None = Field(None, ge=1, description="Evaluate at most this many test rows; None = all.")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Prompts generated together (grouped by length); auto sizes each batch by tokens "
        "(short prompts: up to 128 rows; long ones fewer)."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generation limit; None = longest label + 2 tokens."
    )
    compare_base: bool = Field(True, description="Also run the base model, prompted with the full label list.")
    few_shot: int = Field(3, ge=0, description="Examples from train shown to the few-shot base contender (0 = skip it).")
    metric: Literal["auto", "accuracy", "json", "text"] = Field(
        "auto", description="Task metrics: auto decides from the answers (small label set, JSON objects, free text)."
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    seed: int = Field(0, description="Seeds sampling and the few-shot draw.")
    forgetting_probe: bool = Field(True, description="Run the shipped general-ability probe on base and fine-tune.")
    forgetting_threshold: float = Field(
        0.05, ge=0, description="Flag a regression when the probe score falls by more than this (absolute)."
    )
    reuse_base: bool = Field(
        True, description="Read the base model's results (its contenders, its half of the forgetting check) back from "
        "an earlier evaluation on this machine with the same base, prompts and settings ($TUNELAB_HOME/base-results; "
        "eval.json marks them `reused`); false computes them afresh."
    )

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @property
    def generation_batch(self) -> int | None:
        """Rows per generation batch; None = sized by tokens (evaluate.generate.length_batches)."""
        return None if self.batch_size == "auto" else self.batch_size

    @property
    def loss_batch(self) -> int:
        """Rows per forward pass when scoring reference answers (one pass each, no decoding)."""
        return 32 if self.batch_size == "auto" else self.batch_size


class ModelConfig(_Strict):
    """The base model, and which kernels compute it. In YAML `model: NAME` is short for `model: {name: NAME}`."""

    name: str = Field(DEFAULT_MODEL, description="Base model: 'smollm2-135m-instruct', an HF folder or a .gguf file.")
    kernels: Literal["tunelab", "reference"] = Field(
        "tunelab", description="tunelab: tunelab's kernels (fused LoRA, grouped-query attention, compiled norms, ...); "
        "reference: plain PEFT and transformers modules, nothing compiled: slower, and what the kernels are tested "
        "against (tunelab/model/kernels/__init__.py)."
    )


class RunConfig(_Strict):
    """Everything one run needs. Resolved (absolute paths) and saved as config.json in the run directory."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tuning: Literal["lora", "full"] = Field(
        "lora", description="lora: train an adapter (see `lora`) on a frozen base; full: train every weight."
    )
    objective: Literal["sft", "dpo"] = Field(
        "sft", description="sft: loss on assistant tokens; dpo: preference pairs (data format dpo or chosen_rejected)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: Path = Field(Path("runs"), description="Run directories are created under this folder (relative to the working directory).")
    name: str = Field("run", description="Prefix of the run directory name.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config; relative paths inside it are taken relative to the YAML file.

    `overrides` set dotted keys first ({"lora.rank": 32}, as `--set lora.rank=32`). Every problem is
    reported at once, each with its key and, where the key takes a fixed set, the allowed values.
    """
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"config file not found: {path}", fix="pass the path of a YAML config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TunelabError(f"invalid YAML: {getattr(exc, 'problem', exc)}", fix="correct the YAML syntax", where=where)
    if not isinstance(raw, dict):
        raise TunelabError("the config must be a YAML mapping", fix="write key: value pairs", where=str(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = parse_config(raw, where=str(path))
    if cfg.data.path is not None:
        cfg.data.path = _resolve(path.parent, cfg.data.path)
    return cfg


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from a mapping (a parsed YAML file, an API request), every problem in one TunelabError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        by_key: dict[str, list[dict[str, Any]]] = {}
        for error in exc.errors():  # a value that fits no branch of `int | 'auto'` errs once per branch
            by_key.setdefault(_key(error), []).append(error)
        problems = [_describe(key, errors) for key, errors in by_key.items()]
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise TunelabError(count + "; ".join(problems), where=where,
                           fix="correct these keys (every key, its default and its meaning: tunelab/config.py)") from None


def _key(error: dict[str, Any]) -> str:
    """The dotted key of a pydantic error, without the union branch names pydantic adds (`int`, `literal[...]`)."""
    return ".".join(str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal[", "float", "int")))


def _describe(key: str, errors: list[dict[str, Any]]) -> str:
    """A key's errors in one phrase, naming the allowed keys of a section for an unknown one and every
    accepted form of a value: `key 'train.batch_size': 'big': should be a valid integer or 'auto'`."""
    if errors[0]["type"] == "extra_forbidden":
        parent = key.rpartition(".")[0]
        section = _section(parent.split(".") if parent else [])
        allowed = f" (the keys of {parent or 'a run config'}: {', '.join(section.model_fields)})" if section else ""
        return f"unknown key '{key}'{allowed}"
    messages = [e["msg"].removeprefix("Value error, ").removeprefix("Input should be ") for e in errors]
    messages = [m.split(", unable to")[0] for m in messages]  # "a valid integer, unable to parse ..." -> "a valid integer"
    value = errors[0].get("input")
    shown = f"{value!r}: " if errors[0]["type"] != "missing" and not isinstance(value, (dict, list)) else ""
    lead = "should be " if errors[0]["msg"].startswith("Input should be") else ""
    return f"key '{key}': {shown}{lead}{' or '.join(dict.fromkeys(messages))}"


def _section(path: list[str]) -> type[BaseModel] | None:
    """The config class at a dotted path (['train'] -> TrainConfig), or None."""
    model: type[BaseModel] = RunConfig
    for key in path:
        field = model.model_fields.get(key)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def _set_dotted(raw: dict, dotted: str, value: object) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for depth, key in enumerate(parents):
        if node.get(key) is None:  # a section left empty in YAML (`lora:`) reads as None
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise TunelabError(f"--set {dotted}: '{where}' is not a section", fix="set a key that exists, e.g. train.epochs")
    node[leaf] = value


# `tunelab serve`'s automatic choices, each measured at start on the machine it runs on:
SERVE_BF16_MIN_SPEEDUP = 1.25  # precision auto: bf16 weights when a decode-sized product is this much faster in
# bf16 (below it, bf16's rounding buys too little time to be worth answers that differ from the fp32 reference)
PACKED_MIN_SPEEDUP = 1.1  # weight_layout auto: packed when that much faster (else not worth the packed copy's memory)


class ServeConfig(_Strict):
    """`tunelab serve`: one base model and many adapters behind an OpenAI-compatible API (tunelab/serve/)."""

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 serves this machine only.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, printed at start).")
    base: str = Field(DEFAULT_MODEL, description="The base every adapter runs on (a name, HF folder or .gguf).")
    models: list[str] = Field(
        default_factory=list, description="What to serve besides the base: registry references (name, name@3, "
        "name@production) and run directories. Empty: every model in the registry."
    )
    max_batch_rows: int = Field(32, ge=1, description="Requests decoded together in one step.")
    token_budget: int = Field(1024, ge=16, description="Prompt tokens computed per step beside the decodes "
                              "(one prompt always fits): bounds the pause a new request causes to running ones.")
    max_lora_rank: int = Field(16, ge=1, description="Every adapter slot is this rank; a higher rank is refused.")
    max_adapters: int = Field(8, ge=1, description="Adapters held in memory at once; idle ones are evicted LRU.")
    max_adapters_per_step: int = Field(8, ge=1, description="Distinct adapters in one batch; others wait.")
    queue_size: int = Field(64, ge=1, description="Requests waiting for a batch row; beyond it, 429.")
    max_prompt_tokens: int = Field(4096, ge=1, description="A longer prompt is a 400 naming this limit.")
    max_tokens: int = Field(1024, ge=1, description="The largest max_tokens a request may ask for (400 above).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a chat request does not set it.")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="A larger request body is a 400.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may take in all; then it is cancelled.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 weights where a decode-sized "
                                                       f"product measures {SERVE_BF16_MIN_SPEEDUP}x faster in bf16 "
                                                       "at start, else fp32.")
    lora_kernel: Literal["auto", "grouped", "masked", "gathered", "segmented", "fused"] = Field(
        "auto", description="How rows of different adapters are computed together (serve/multi_lora.py); auto: "
        "fused (one native call per layer, built at start with the system's C++ compiler) for decode steps where it "
        "builds; else grouped when one adapter serves every row, else segmented. bench/engine_step.py measures them."
    )
    weight_layout: Literal["auto", "packed", "plain"] = Field(
        "auto", description="packed: the base's weights packed once in oneDNN's layout (model/kernels/packed.py); "
        f"auto: packed where a decode-sized product measures {PACKED_MIN_SPEEDUP}x faster that way at start.")
    threads: int | None = Field(None, ge=1, description="torch threads for the engine; None: all cores but one "
                                "(the HTTP side needs one of its own).")
    prefill_threads: int | None = Field(None, ge=1, description="torch threads for a step that computes at least "
                                        "`prefill_parallel_tokens` prompt tokens; None: all cores. A prompt pass "
                                        "is compute-bound and the HTTP side waits on it anyway; decode steps keep "
                                        "`threads`.")
    prefill_parallel_tokens: int = Field(256, ge=1, description="Prompt tokens in one step from which it runs on "
                                         "`prefill_threads`.")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys accepted besides the store's "
                                "(`tunelab keys create`); they act for the project 'default'. With no key at all, "
                                "none is checked (then binding beyond 127.0.0.1 prints a warning).")
    # --- the fine-tuning service (tunelab/service/): OpenAI's files and fine_tuning routes on the same server
    fine_tuning: bool = Field(True, description="Serve /v1/files and /v1/fine_tuning and run queued jobs.")
    db: str | None = Field(None, description="The service's database: sqlite:////path.sqlite or "
                           "postgresql://user@host:port/db (several API hosts); None: SQLite under `storage`.")
    storage: Path | None = Field(None, description="Where uploads and job runs live; None: $TUNELAB_HOME/service.")
    job_concurrency: int = Field(1, ge=0, description="Jobs this server trains at once (0: only accept and queue "
                                 "them, for another host to run).")
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="A larger upload is a 413 (OpenAI's limit: 512 MB).")
    job_checkpoint_every: int = Field(50, ge=1, description="A job checkpoints every N steps (its default "
                                      "train.checkpoint_every): what a crashed job resumes from.")
    worker_heartbeat_seconds: float = Field(5.0, gt=0, description="How often a job's worker reports it is alive.")
    worker_stale_seconds: float = Field(60.0, gt=0, description="A running job silent this long is resumed by "
                                        "another attempt.")
    job_max_attempts: int = Field(3, ge=1, description="Starts of one job (the first and each resume after a crash) "
                                  "before it fails.")


ExportTarget = Literal["hf", "gguf", "gguf-adapter", "ollama"]
# GGUF tensor types tunelab writes itself (gguf.quants): f32/f16/bf16 exact casts, q8_0 (llama.cpp's bit-exact
# reference), q4_0/q4_1 (4-bit, measured and warned about: they can round a fine-tune's small delta away).
GgufQuant = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]


class ExportConfig(_Strict):
    """`tunelab export` / `tunelab.export`: a fine-tune as a merged HF folder, a GGUF (model or LoRA), or for Ollama,
    verified against the unmerged model (tunelab/export/, docs/export.md)."""

    to: ExportTarget = Field(..., description="hf: merged HF folder; gguf: merged GGUF; gguf-adapter: the LoRA as a "
                             "GGUF over the base GGUF (llama.cpp --lora); ollama: merged GGUF + Modelfile.")
    path: Path = Field(..., description="Output: a folder (hf, ollama) or a .gguf file (gguf, gguf-adapter).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="hf: dtype of the saved weights; auto = the base's own (config.json's dtype), else float32.")
    quant: GgufQuant = Field("q8_0", description="gguf, ollama: tensor type of the merged GGUF's matrices (norms and "
                             "other 1-D tensors stay F32, as llama.cpp's converter does).")
    adapter_type: Literal["f32", "f16"] = Field("f32", description="gguf-adapter: tensor type of lora_a / lora_b.")
    verify: bool = Field(True, description="Compute the verification figures; a failed check is an error. "
                         "False (--no-verify) is recorded in export.json.")
    overwrite: bool = Field(False, description="Replace an existing output path.")
    prompts: int = Field(8, ge=1, description="Verification prompts, from the run's own test split.")
    new_tokens: int = Field(32, ge=1, description="Greedy tokens generated per verification prompt.")
    merge_tolerance: float = Field(1e-4, gt=0, description="Max |logit difference|, fp32 unmerged vs merged ...")
    merge_relative: float = Field(
        1e-5, gt=0, description="... or this fraction of the largest |logit|, if larger: fp32 rounds x W^T + s (x A^T) "
        "B^T and x (W + s B A)^T differently, and over 30 layers with logits up to 44 (SmolLM2) that noise alone "
        "measured 1.8e-4.")
    non_vacuity: float = Field(1e-3, gt=0, description="The merged model must differ from the base by at least this "
                               "max |logit difference| (or in a greedy token): else the merge returned the base.")
    gguf_tolerance: dict[str, float] = Field(
        default_factory=lambda: {"f32": 1e-4, "f16": 0.1, "bf16": 0.5},
        description="Max |logit difference| of a float GGUF (or a float16 / bfloat16 HF folder) read back, against "
        "the merged fp32 model. Measured on a SmolLM2-135M fine-tune (30 layers, logits up to 44): F32 0.0, F16 "
        "0.034; f32 also takes merge_relative. BF16 (8 mantissa bits, 1/8 of F16's precision) is set 5x F16.")
    min_top1_agreement: float = Field(0.9, ge=0, le=1, description="q8_0: share of positions whose top-1 token "
                                      "equals the fp32 merge's (teacher-forced over prompts and continuations).")
    adapter_tolerance: dict[str, float] = Field(
        default_factory=lambda: {"f32": 1e-5, "f16": 5e-3},
        description="gguf-adapter, per adapter_type: max |difference| of (alpha/r) B A read back against PEFT's delta "
        "weight, relative to the delta's largest entry.")
