"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny Llama, both built offline.

Nothing here downloads anything: the tokenizer is trained in-process on a small
corpus, the model is a randomly initialised 2-layer Llama (hidden 16) saved as an
HF folder, so `tunelab.model.load.resolve_model(str(folder))` accepts it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Offline, always; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
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
    import json

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


@pytest.fixture(scope="session", autouse=True)
def _tunelab_home(tmp_path_factory: pytest.TempPathFactory):
    """Nothing a test does writes to ~/.cache/tunelab."""
    home = tmp_path_factory.mktemp("tunelab_home")
    old = os.environ.get("TUNELAB_HOME")
    os.environ["TUNELAB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TUNELAB_HOME", None)
    else:
        os.environ["TUNELAB_HOME"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOT, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOT,
        eos_token=EOT,
        pad_token=EOT,
        additional_special_tokens=[BOT, EOT],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        # Frozen tied embeddings at the default std 0.02 bound every logit to about +-0.3, so no adapter
        # could move the loss far from ln(vocab); 0.2 gives the tiny model logits it can learn with.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """(model, tokenizer) loaded the way tunelab loads them (fp32). Do not mutate the model."""
    from tunelab.model.load import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
    model.eval()
    return model, tokenizer


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def classification_csv(tmp_path: Path) -> Path:
    """text,label CSV: 5 labels x 15 short distinct texts."""
    return write_csv(tmp_path / "intents.csv", classification_rows())


@pytest.fixture
def make_config(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., "RunConfig"]:  # noqa: F821
    """Build a RunConfig on the tiny model, writing runs under tmp_path/runs. Keyword overrides per section."""

    def build(csv_path: Path, *, data: dict | None = None, lora: dict | None = None, train: dict | None = None,
              eval: dict | None = None, output_dir: Path | None = None):  # noqa: A002
        return make_run_config(tiny_model_dir, csv_path, output_dir or tmp_path / "runs",
                               data=data, lora=lora, train=train, eval=eval)

    return build


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
            "train": {"precision": "fp32", "batch_size": 8, "epochs": 1, "val_rows": 8, "warmup_ratio": 0.0,
                      **(train or {})},
            "eval": {"max_rows": 6, "batch_size": 4, **(eval or {})},
        }
    )


class TrainedRun:
    """One real pipeline run on the tiny model, shared by the tests that inspect its results."""

    def __init__(self, summary: dict, result, cfg) -> None:
        self.summary = summary
        self.result = result  # tunelab.train.recipe.TrainResult: the in-memory trained model and its data
        self.cfg = cfg
        self.path = Path(summary["run_dir"])


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """run_pipeline on the 5-label CSV: lr 1e-2, 6 epochs, evaluation against the base included."""
    import tunelab.pipeline
    from tunelab.train.recipe import train

    folder = tmp_path_factory.mktemp("trained")
    csv_path = write_csv(folder / "intents.csv", classification_rows())
    cfg = make_run_config(
        tiny_model_dir, csv_path, folder / "runs",
        lora={"rank": 8, "alpha": 16},
        train={"learning_rate": 1e-2, "epochs": 6, "batch_size": 8, "warmup_ratio": 0.05, "seed": 0},
        eval={"max_rows": 8, "batch_size": 4, "compare_base": True},
    )
    captured = []

    def capturing_train(*args, **kwargs):
        captured.append(train(*args, **kwargs))
        return captured[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tunelab.pipeline, "train", capturing_train)
        summary = tunelab.pipeline.run_pipeline(cfg)
    (result,) = captured
    return TrainedRun(summary, result, cfg)
