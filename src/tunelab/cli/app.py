"""`tunelab <verb>`: each verb maps to one function; nothing else lives here.

    tunelab demo [--json]                 Banking77 -> LoRA fine-tune of SmolLM2 -> compare with the base
    tunelab train CONFIG.yaml [--set k=v]  train + evaluate with a config of your own
    tunelab plan CONFIG.yaml              tokens, steps, time, cost and memory, before training
    tunelab eval RUN_DIR [--data FILE]    fine-tune vs base zero-shot vs few-shot; eval.json + report.html
    tunelab chat RUN_DIR "message"        answer one message with a fine-tune
    tunelab serve [--model NAME@ALIAS]    the base and fine-tunes behind an OpenAI-compatible API
    tunelab export RUN --to hf|gguf|gguf-adapter|ollama -o OUT   merged / GGUF / Ollama, verified
    tunelab models register|list|show|diff|promote|rollback|delete|log   the model registry
    tunelab keys create|list|revoke       bearer keys of the fine-tuning API, one project each
    tunelab data validate|lint|clean|split|convert FILE   check and prepare data before training
    tunelab data validate FILE [--json]   every problem of a data file, one line each (exit 1 on errors)
    tunelab data convert FILE -o OUT      any accepted data format -> OpenAI chat JSONL

A mistake a user can make (missing file, bad column, unknown model) prints one
line saying where, what and how to fix it, and exits with code 2.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.text import Text  # noqa: E402

from tunelab.cli import run  # noqa: E402
from tunelab.cli.data import data_app  # noqa: E402
from tunelab.cli.export import export_cmd  # noqa: E402
from tunelab.cli.keys import keys_app  # noqa: E402
from tunelab.cli.models import models_app  # noqa: E402
from tunelab.cli.render import err  # noqa: E402
from tunelab.cli.serve import serve_cmd  # noqa: E402
from tunelab.errors import Interrupted, TunelabError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune an open model on your task, and prove it.")
app.command()(run.demo)
app.command("train")(run.train_cmd)
app.command()(run.plan)
app.command("eval")(run.eval_cmd)
app.command()(run.chat)
app.command("serve")(serve_cmd)
app.command("export")(export_cmd)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")

# Verbs that load a model and run it: these run on tcmalloc when the system has it (see tunelab.cli.allocator).
MODEL_VERBS = frozenset({"demo", "train", "plan", "eval", "chat", "serve", "export"})
TRAINING_VERBS = frozenset({"demo", "train", "plan"})  # their run log names the allocator (its effect is on training)


class RunLog(logging.Handler):
    """The run log on the stderr console, above any live progress bar: `precision: fp32 ...` with the part
    before the first colon in bold, warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a logging call with bad arguments must not stop a run
            self.handleError(record)
            return
        key, sep, rest = message.partition(": ")
        style = "yellow" if record.levelno >= logging.WARNING else ""
        text = Text.assemble((key + sep, "bold " + style if sep else style), (rest, style))
        err.print(text, soft_wrap=True)


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in MODEL_VERBS:
        from tunelab.cli.allocator import relaunch_with_tcmalloc

        relaunch_with_tcmalloc()  # replaces this process when it relaunches; otherwise returns

    import warnings

    # transformers deprecation notices raised from inside PEFT: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    log = logging.getLogger("tunelab")
    log.setLevel(logging.INFO)
    log.addHandler(RunLog())
    log.propagate = False  # printed once, here
    relaunching = any(a == "--nproc" or a.startswith("--nproc=") for a in sys.argv) and "WORLD_SIZE" not in os.environ
    if sys.argv[1:2] and sys.argv[1] in TRAINING_VERBS and os.environ.get("RANK", "0") == "0" and not relaunching:
        from tunelab.cli.allocator import describe

        log.info("allocator: %s", describe())
    try:
        app()
    except Interrupted as exc:  # a clean stop on SIGINT/SIGTERM, with a checkpoint to resume from
        err.print(f"[yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except TunelabError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
