"""What tests share besides fixtures: the tiny data set, a config builder, the files a run writes.

Tests import these by name (`from helpers import write_csv`); pytest puts tests/ on the path
(pyproject's `pythonpath`). The fixtures that build the tiny model live in conftest.py.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tunelab.data.tokenize import TokenizedExample

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # data files of known content (formats/, malformed/)
EOT = "<|im_end|>"
BOT = "<|im_start|>"

# SmolLM2-135M-Instruct's ChatML template (same behaviour).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What checkpoint.py's docstring promises, plus adapter/README.md, a model card PEFT's
# save_pretrained always writes (the docstring lists only the two adapter files).
EXPECTED_FILES = {
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/README.md",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/chat_template.jinja",
    "config.json",
    "data.json",
    "metrics.jsonl",
    "eval.json",
    "report.html",
    "report.md",
    "manifest.json",
}
# The final checkpoint (its step number varies): optimizer state for `tunelab train --resume`.
CHECKPOINT_FILES = {"checkpoint.json", "trainable.safetensors", "optimizer.safetensors", "state.json"}


def expected_files(run: Path) -> set[str]:
    """EXPECTED_FILES plus the checkpoint of the run's last step."""
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return EXPECTED_FILES | {f"checkpoints/step-{max(steps):07d}/{name}" for name in CHECKPOINT_FILES}


def files_of(path: Path) -> set[str]:
    """Every file under a folder, as relative POSIX paths."""
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}

# Classification data set used by the training / evaluation tests: 5 labels, 15 texts each.
LABELS = {
    "card_arrival": "card",
    "exchange_rate": "rate",
    "lost_phone": "phone",
    "top_up": "top up",
    "refund": "refund",
}
TEMPLATES = [
    "where is my {w}",
    "my {w} is late",
    "help with {w}",
    "question about the {w}",
    "{w} problem today",
    "what about my {w}",
    "please check the {w}",
    "i need the {w} now",
    "is the {w} ok",
    "tell me about {w}",
    "the {w} again",
    "why the {w}",
    "how does {w} work",
    "status of {w}",
    "can you fix the {w}",
]


def classification_rows() -> list[tuple[str, str]]:
    return [(t.format(w=w), label) for label, w in LABELS.items() for t in TEMPLATES]


def _corpus() -> list[str]:
    words = [
        "system", "user", "assistant", "You are a helpful assistant.", "Classify the intent.",
        "Answer with exactly one label from this list and nothing else.", "Labels:",
        "hello world", "the quick brown fox jumps over the lazy dog", "what is two plus two", "four",
        "good morning", "good night", "thank you", "yes", "no", "maybe",
    ]
    rows = [f"{text} {label}" for text, label in classification_rows()]
    return (words + list(LABELS) + rows) * 3


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path



def make_run_config(model_dir: Path, csv_path: Path, output_dir: Path, *, data: dict | None = None,
                    lora: dict | None = None, train: dict | None = None, eval: dict | None = None):  # noqa: A002
    from tunelab.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": str(model_dir),
            "name": "tiny",
            "output_dir": str(output_dir),
            "data": {"path": str(csv_path), "format": "csv", "input_column": "text", "output_column": "label",
                     "max_length": 64, **(data or {})},
            "lora": {"rank": 4, "alpha": 8, **(lora or {})},
            "train": {"precision": "fp32", "batch_size": 8, "epochs": 1, "learning_rate": 1e-3, "val_rows": 8,
                      "warmup_ratio": 0.0, **(train or {})},
            "eval": {"max_rows": 6, "batch_size": 4, **(eval or {})},
        }
    )


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def run_log() -> Iterator[list[str]]:
    """The run log (INFO lines of the `tunelab` loggers, as the CLI prints them) written while the block runs."""
    handler, logger = _Lines(), logging.getLogger("tunelab")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def with_tunelab_layers(peft_model):
    """A copy of a PEFT model whose LoRA layers are tunelab's classes (fused LoRA, row-norm DoRA), the same
    weights: what `model.load.attach_lora` builds through PEFT's custom-module mapping (tests/model/test_load.py
    checks that both agree), made here from a PEFT model so a test can hold the two side by side."""
    import copy

    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.variants import DoraLinearVariant

    from tunelab.model.kernels import lora_layer_classes
    from tunelab.model.kernels.dora import RowNormDoraLayer, RowNormDoraVariant
    from tunelab.model.kernels.fused_lora import FusedLoraLinear

    ours = copy.deepcopy(peft_model)
    four_bit = {base: cls for base, cls in lora_layer_classes("tunelab").items() if cls is not FusedLoraLinear}
    for module in ours.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
        for cls in four_bit.values():
            if type(module) is cls.__bases__[1]:  # Fused<PEFT Linear4bit>(Fused4bitLinear, Linear4bit)
                module.__class__ = cls
        for name, variant in list(getattr(module, "lora_variant", {}).items()):
            if type(variant) is DoraLinearVariant:
                module.lora_variant[name] = RowNormDoraVariant()
                magnitude = module.lora_magnitude_vector[name]
                layer = RowNormDoraLayer(fan_in_fan_out=magnitude.fan_in_fan_out)
                layer.weight = magnitude.weight
                module.lora_magnitude_vector[name] = layer
    return ours


def tunelab_layer_count(model) -> int:
    """How many of the model's LoRA layers are tunelab's (fused) classes."""
    from tunelab.model.kernels.fused_lora import Fused4bitLinear, FusedLoraLinear

    return sum(isinstance(m, (FusedLoraLinear, Fused4bitLinear)) for m in model.modules())


def comparison(delta: float = 0.3, significant: bool = True, metric: str = "accuracy") -> dict:
    """One comparison of eval.json (tunelab.evaluation.result.Comparison), fine-tune at 0.9."""
    return {"metric": metric, "finetune": 0.9, "baseline": 0.9 - delta, "delta": delta,
            "delta_ci": [delta - 0.05, delta + 0.05], "test": "mcnemar", "p_value": 1e-9 if significant else 0.4,
            "significant": significant, "wins": 30, "losses": 1}


def contender(value: float, metric: str = "accuracy") -> dict:
    """One contender of eval.json: 40 rows, `value` of them right."""
    right = round(40 * value)
    return {"metrics": {metric: value, "loss": 0.3}, "ci": {metric: [value - 0.05, value + 0.05]},
            "prompt_tokens_mean": 33.0, "seconds": 1.0, "ms_per_request": 25.0,
            "predictions": ["a"] * 40, "correct": [True] * right + [False] * (40 - right),
            "scores": [1.0] * right + [0.0] * (40 - right)}


def eval_json(task: str = "classification", metric: str = "accuracy", flagged: bool = False, **comparisons: dict) -> dict:
    """An eval.json (tunelab-eval/2) whose fine-tune beats both baselines significantly, unless `comparisons` say
    otherwise; `flagged`: the forgetting check flagged."""
    comparisons = comparisons or {"base_zero_shot": comparison(metric=metric),
                                  "base_few_shot": comparison(0.1, metric=metric)}
    shift = {"base": 0.4, "finetune": 0.39, "delta": -0.01}
    return {"format": "tunelab-eval/2", "task": task, "metric": metric, "test_rows": 40,
            "contenders": {"finetune": contender(0.9, metric),
                           **{name: contender(0.9 - c["delta"], metric) for name, c in comparisons.items()}},
            "comparisons": comparisons,
            "forgetting": {"probe_items": 100, "probe": shift, "general_text_loss": shift, "general_text_tokens": 100,
                           "threshold": 0.05, "loss_tolerance": 0.1, "flagged": flagged,
                           "why": "probe score fell 0.09 (threshold 0.05)" if flagged
                           else "probe score fell 0.01 (threshold 0.05)"}}


def pairs_file(folder: Path) -> Path:
    """48 preference pairs (prompt / chosen / rejected) a tiny model can learn to tell apart, as JSONL."""
    rows = []
    for i, (good, bad) in enumerate([("refund", "card"), ("top up", "phone"), ("rate", "refund"), ("card", "rate")] * 12):
        rows.append({"prompt": f"question {i} about the {good}", "chosen": f"yes the {good}", "rejected": f"no {bad}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*args: str, cwd: Path, timeout: int = 300):
    """`python -m tunelab ARGS` in a subprocess that imports this checkout's tunelab (whatever is installed)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def run_data(**overrides) -> dict:
    """A data.json (tunelab.rundir.RunData) of a 75-row classification run, for tests that build a run by hand."""
    stats = {"mean": 35.0, "min": 30, "max": 46}
    data = {
        "path": "/data/intents.csv", "sha256": "ab12cd34ef56" * 5, "objective": "sft", "rows": 75,
        "splits": {"train": 60, "validation": 0, "test": 15}, "stratified": True, "labels": 5, "train_rows_used": 60,
        "dropped_too_long": {"count": 0, "first": []}, "validation_rows_used": 0, "tokens_per_example": stats,
        "trained_tokens_per_example": {"mean": 4.5, "min": 3, "max": 6}, "train_tokens": 2100, "train_trained_tokens": 270,
        "base_model": {"spec": "tiny", "path": "/models/tiny", "weights": "0123456789abcdef"},
        "hyperparameters": {"epochs": {"value": 1.0, "why": "set in the config", "source": "config"}},
        "processes": 1, "chat_template": {"renders": [["one turn", "<|im_start|>user..."]], "eos_token": "<|im_end|>",
                                          "fingerprint": "f" * 64},
        "lengths": {"tokens": [30 + i % 17 for i in range(60)], "trained_tokens": [3 + i % 4 for i in range(60)]},
    }
    return {**data, **overrides}


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A user mistake: exit 2, one `error:` line holding every fragment, no traceback, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_config(path: Path, model: str, data: Path, output_dir: Path, **data_keys: str) -> Path:
    """A small CSV run config for CLI tests: fp32, one epoch at batch 8, 4 validation and 4 test rows."""
    extra = "".join(f"  {k}: {v}\n" for k, v in data_keys.items())
    path.write_text(
        f"model: {model}\nname: cli\noutput_dir: {output_dir}\n"
        f"data:\n  path: {data}\n  format: csv\n{extra}"
        "train: {precision: fp32, batch_size: 8, epochs: 1, learning_rate: 1.0e-3, val_rows: 4}\n"
        "eval: {max_rows: 4, batch_size: 4}\n",
        encoding="utf-8",
    )
    return path


def sft_loss(model):
    """The SFT loss module the recipe steps on, over `model`."""
    from tunelab.training.objectives import Sft
    from tunelab.training.step import ObjectiveLoss

    return ObjectiveLoss(model, Sft())


def varied_examples(tokenizer) -> list[TokenizedExample]:
    """Four short conversations of four lengths and at least three numbers of trained tokens."""
    from tunelab.data.records import Conversation, Message
    from tunelab.data.tokenize import tokenize_conversations

    pairs = [
        ("yes", "no"),
        ("the quick brown fox jumps over the lazy dog", "good night"),
        ("hello world", "You are a helpful assistant."),
        ("what is two plus two and why", "four"),
    ]
    convs = [Conversation((Message("user", u), Message("assistant", a)), f"t:{i}") for i, (u, a) in enumerate(pairs)]
    exs, _ = tokenize_conversations(tokenizer, convs, max_length=256)
    assert len({len(e.input_ids) for e in exs}) == 4, "examples must differ in length"
    assert len({e.trained_tokens for e in exs}) >= 3, "examples must differ in trained tokens"
    return exs


def lora_grads_and_zero(model) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients, then zeroed for the next backward."""
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def lora_with_random_adapter(tiny_model_dir, seed: int):
    """Tiny model + LoRA whose adapter weights are all non-zero.

    LoRA B starts at 0, which would make every lora_A gradient 0 and hide mistakes.
    """
    import torch

    from tunelab.config import LoraConfig
    from tunelab.model.load import attach_lora, load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    model = attach_lora(model, LoraConfig(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train()
    return model, tokenizer


# (prompt, chosen, rejected): short answers the tiny tokenizer knows
PAIRS = [
    ("what is two plus two", "four", "maybe"),
    ("good morning", "hello world", "no"),
    ("where is my card", "card_arrival", "refund"),
    ("help with rate", "exchange_rate the quick brown fox", "top_up"),
    ("is the phone ok", "lost_phone", "good night"),
    ("thank you", "yes", "the lazy dog jumps over the quick brown fox"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chosen_rejected_rows(pairs=PAIRS) -> list[dict]:
    """The pairs as {"prompt", "chosen", "rejected"} rows."""
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]


def dpo_rows(pairs=PAIRS) -> list[dict]:
    """The pairs in OpenAI's preference shape (input.messages, preferred_output, non_preferred_output)."""
    return [{"input": {"messages": [{"role": "user", "content": p}]},
             "preferred_output": [{"role": "assistant", "content": c}],
             "non_preferred_output": [{"role": "assistant", "content": r}]} for p, c, r in pairs]


def many_pairs(n: int) -> list[tuple[str, str, str]]:
    """n pairs with distinct prompts and the first pair's answers."""
    return [(f"{p} {i}", c, r) for i in range(n) for p, c, r in PAIRS[:1]]
