"""tunelab: fine-tune an open language model on one team's task, and prove that it worked.

The Python API, the same path as the `tunelab` command:

    import tunelab as tl

    cfg = tl.load_config("run.yaml", overrides={"lora.rank": 32})   # or tl.RunConfig(data={"path": ...})
    report = tl.data.validate("train.jsonl")                         # every problem at its line: .errors, .warnings
    plan = tl.plan(cfg)                                              # tokens, steps, time, cost, measured here
    run = tl.train(cfg)                                              # a whole run directory (tl.RunDir)
    result = tl.evaluate(run)                                        # fine-tune vs the base -> tl.EvalResult
    model, tokenizer = tl.load(run)                                  # or tl.load("banking@production")
    reg = tl.Registry(); reg.register(run.path, "banking"); reg.promote("banking@1")
    record = tl.export("banking@1", to="gguf", path="out/banking.gguf")    # verified; tl.ExportRecord

Progress bars go to stderr; the run log goes to the standard `logging` loggers under "tunelab"
(`logging.basicConfig(level=logging.INFO)` shows it). A mistake a user can make raises
`tl.TunelabError`, which says where, what, and how to fix it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import data
from tunelab.config import RunConfig, load_config
from tunelab.errors import TunelabError
from tunelab.evaluation.result import EvalResult
from tunelab.export.record import ExportRecord
from tunelab.registry import Registry
from tunelab.rundir import RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.data.read import Records
    from tunelab.planning import Plan

__version__ = "0.1.0"
__all__ = ["EvalResult", "ExportRecord", "Registry", "RunConfig", "RunDir", "TunelabError", "__version__", "data",
           "evaluate", "export", "load", "load_config", "plan", "train"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
# bitsandbytes (the `quant` extra) warns on import, in every process, that it could not fetch a CPU NF4 kernel
# from the Hugging Face hub ("kernels-community"). tunelab never downloads at run time, and bitsandbytes'
# built-in CPU path is the one tunelab uses, so the warning only misleads. On a CPU with AVX512-BF16 the fetch
# goes through the `kernels` package, which says instead that it skipped a "publisher trust check" offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)


def train(cfg: RunConfig, records: Records | None = None, *, resume: Path | str | None = None) -> RunDir:
    """Train as `cfg` says and return the run directory, whole (adapter or model, tokenizer, config, data
    report, metrics, checkpoints, manifest). Not evaluated yet: `evaluate(run)` adds that.

    `records`: the data in memory instead of `cfg.data.path`: conversations or preference pairs, as dicts
    in any accepted shape (OpenAI chat, prompt/completion, Alpaca, ShareGPT, DPO) or as
    `tunelab.data.records` objects; they are kept in the run (records.jsonl). `resume`: continue an
    unfinished run directory from its newest checkpoint (`cfg` is then read from it: pass None).
    """
    from tunelab.training.recipe import train as train_recipe

    if resume is not None:
        cfg = RunDir(Path(resume)).config()
    result = train_recipe(cfg, resume=Path(resume) if resume is not None else None, records=records)
    return result.run


def evaluate(run: RunDir | Path | str, data: Path | str | None = None, **eval_overrides: Any) -> EvalResult:
    """The fine-tune against the base model (zero-shot and few-shot, or for DPO its preferences) on the run's
    held-out rows, or on every row of `data`; writes eval.json and the report (under evals/ for `data`).

    `eval_overrides`: keys of the run's `eval` config, e.g. max_rows=200, few_shot=5.
    """
    from tunelab.pipeline import HELD_OUT_NAME, evaluate_run_dir

    folder = run.path if isinstance(run, RunDir) else Path(run)
    evaluate_run_dir(folder, Path(data) if data is not None else None, overrides=eval_overrides)
    manifest = RunDir(folder).manifest()
    name = HELD_OUT_NAME if data is None else next(reversed(manifest.evaluations))
    return EvalResult.read(folder / manifest.evaluations[name])


def load(run: RunDir | Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fine-tune ready to generate: a run directory, or a registry reference (`name`, `name@3`,
    `name@production`). The base model with the run's adapter (or the fully tuned model), and the
    tokenizer and chat template it was trained with, checked against what it recorded."""
    from tunelab.model.precision import choose_precision
    from tunelab.rundir import load_run

    path = run.path if isinstance(run, RunDir) else Path(run)
    if not path.exists() and isinstance(run, str):
        path = Registry().resolve(run).path
    model, tokenizer, _ = load_run(path, dtype=choose_precision("auto").weights_dtype)
    return model, tokenizer


def plan(cfg: RunConfig) -> Plan:
    """What a run of `cfg` will cost on this machine, measured by a few real steps: tokens, steps, seconds,
    memory, and where each hyperparameter comes from. Writes nothing."""
    from tunelab.planning import make_plan

    return make_plan(cfg)


def export(run: RunDir | Path | str, to: str, path: Path | str, **options: Any) -> ExportRecord:
    """A fine-tune where people run models, verified: `to` is "hf" (merged HF folder), "gguf" (merged GGUF for
    llama.cpp), "gguf-adapter" (the LoRA as a GGUF over the base GGUF) or "ollama" (merged GGUF + Modelfile).
    `run`: a run directory or a registry reference (`banking@production`). `options`: `tunelab.config.ExportConfig`
    fields, e.g. quant="f16", dtype="bfloat16", verify=False, overwrite=True. Returns the record written as
    export.json; a failed verification raises TunelabError and writes nothing (docs/export.md)."""
    from tunelab.export import export as export_run

    return export_run(run, to, path, **options)
