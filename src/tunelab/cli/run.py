"""`tunelab demo|train|plan|eval|chat`: the verbs that run a model, each mapped to one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.cli.render import print_plan, print_summary
from tunelab.errors import TunelabError

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "banking77" / "demo.yaml"
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. lora.rank=32")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """`--set k=v` options -> {"k": v}, each value read as YAML ("32" -> 32, "null" -> None, "[a, b]" -> list)."""
    import yaml

    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TunelabError(f"--set {item!r} is not KEY=VALUE", fix="write e.g. --set lora.rank=32")
        out[key] = yaml.safe_load(value)
    return out


def _run(config: Path | None, sets: list[str] | None, as_json: bool, resume: Path | None = None) -> None:
    from tunelab.config import load_config
    from tunelab.rundir import RunDir

    # The config first: a mistake in it is reported before torch is imported (seconds).
    cfg = RunDir(resume).config() if resume else load_config(config, parse_sets(sets))
    from tunelab.pipeline import run_pipeline

    summary = run_pipeline(cfg, resume=resume)
    if summary is None:  # a torchrun process other than rank 0: it trained its share, rank 0 reports
        return
    if as_json:
        print(summary.model_dump_json())
    else:
        print_summary(summary)


def demo(as_json: JsonOption = False, sets: SetOption = None) -> None:
    """Fine-tune SmolLM2-135M-Instruct on Banking77 and compare it with the base model on the same test rows."""
    if not DEMO_CONFIG.is_file():
        raise TunelabError(f"demo config not found at {DEMO_CONFIG}", fix="run from a checkout of the tunelab repository")
    _run(DEMO_CONFIG, sets, as_json)


def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML run config (see examples/banking77/demo.yaml).")] = None,
    as_json: JsonOption = False,
    sets: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only estimate tokens, time, cost and memory.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory from its newest checkpoint.")] = None,
    nproc: Annotated[int, typer.Option(help="Train with N processes (torch.distributed via torchrun).")] = 1,
) -> None:
    """Train (LoRA, DoRA, full, DPO), evaluate against the base model, and write a run directory."""
    if (config is None) == (resume is None):
        raise TunelabError("give either a CONFIG file or --resume RUN_DIR", fix="tunelab train CONFIG.yaml, or "
                           "tunelab train --resume runs/NAME-...")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
        return
    if dry_run:
        plan(config, as_json=as_json, sets=sets)
    else:
        _run(config, sets, as_json, resume)


def _relaunch_with_torchrun(nproc: int) -> None:
    """`tunelab train --nproc N ...` == `torchrun --nproc-per-node N -m tunelab train ...` (standalone rendezvous)."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tunelab", *args]
    code = subprocess.call(command)
    if code:
        sys.exit(code)


def plan(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    as_json: JsonOption = False,
    sets: SetOption = None,
    price_per_hour: Annotated[float | None, typer.Option(help="Machine price in USD per hour, for the cost estimate "
                                                         "(default: about a 2-vCPU cloud VM's).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the plan as JSON here.")] = None,
) -> None:
    """Estimate a run before spending compute: tokens, steps, time (from a measured probe), cost, memory."""
    from tunelab.config import load_config
    from tunelab.io import write_text_atomic

    cfg = load_config(config, parse_sets(sets))  # before torch is imported, as in `train`
    from tunelab.planning import DEFAULT_PRICE_PER_HOUR, make_plan

    result = make_plan(cfg, price_per_hour=DEFAULT_PRICE_PER_HOUR if price_per_hour is None else price_per_hour)
    if output:
        write_text_atomic(output, result.model_dump_json(indent=2) + "\n")
    if as_json:
        print(result.model_dump_json())
        return
    print_plan(result, config)


def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunelab train` or `tunelab demo`.")],
    data: Annotated[Path | None, typer.Option(help="Evaluate on this data file instead of the run's test split "
                                              "(written to RUN_DIR/evals/NAME/; eval.json stays the held-out one).")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="Format of --data (default: detected).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override an eval key, e.g. eval.few_shot=5")] = None,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune vs base zero-shot vs base few-shot on the same rows; writes eval.json, report.html, report.md."""
    from tunelab.pipeline import evaluate_run_dir

    overrides = {}
    for key, value in parse_sets(sets).items():
        if not key.startswith("eval."):
            raise TunelabError(f"--set {key}: tunelab eval only takes eval.* keys", fix="e.g. --set eval.max_rows=200")
        overrides[key.removeprefix("eval.")] = value
    summary = evaluate_run_dir(run_dir, data, data_format, overrides)
    if as_json:
        print(summary.model_dump_json())
        return
    print_summary(summary)


def chat(
    run_dir: Annotated[str, typer.Argument(help="A run directory, or a registered model (NAME, NAME@VERSION, "
                                           "NAME@ALIAS).")],
    message: Annotated[str, typer.Argument(help="The user message.")],
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit.")] = 128,
) -> None:
    """Answer one message with a fine-tune (its own system prompt and chat template)."""
    import tunelab as tl
    from tunelab.data.records import Message
    from tunelab.data.tokenize import render_prompt
    from tunelab.evaluation.generate import generate
    from tunelab.model.precision import choose_precision

    path = Path(run_dir) if Path(run_dir).exists() else tl.Registry().resolve(run_dir).path
    model, tokenizer = tl.load(path)
    system = tl.RunDir(path).config().data.system_prompt
    messages = ([Message("system", system)] if system else []) + [Message("user", message)]
    prompt = render_prompt(tokenizer, messages)
    run = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1,
                   precision=choose_precision("auto"))
    print(run.generations[0].text)
