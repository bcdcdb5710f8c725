"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny Llama, both built offline.

Nothing here downloads anything: the tokenizer is trained in-process on a small
corpus, the model is a randomly initialised 2-layer Llama (hidden 16) saved as an
HF folder, so `tunelab.model.load.resolve_model(str(folder))` accepts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Offline, always; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from helpers import BOT, CHAT_TEMPLATE, EOT, _corpus, classification_rows, make_run_config, write_csv  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/integration/ are end-to-end runs: marked `integration`, left out of `make test-fast`."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _no_shared_graph_cache_from_tests():
    """Graphs torch.compile builds inside pytest stay out of torch's on-disk FX graph cache.

    Under `--import-mode=importlib` test modules are named `tests.*`, and a compiled graph cached from this
    process can name them; a `tunelab train` subprocess (tests/integration/test_resume.py) that hits the same
    cache key then logs "fx graph cache unable to load compiled graph ... No module named 'tests'" with a
    traceback (seen on a fresh cache, session 17). The subprocesses keep the cache; only this process skips it.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    yield


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_per_module():
    """torch's thread count back to what it was after each module. A server built in the test process
    (serve.server.build_state) sets it for the whole process (one thread for its engine), and a later module that
    trains in-process and compares bitwise with a `tunelab train` subprocess (on torch's default) would differ
    in the last bits: another thread count sums in another order."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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



class TrainedRun:
    """One real pipeline run on the tiny model, shared by the tests that inspect its results."""

    def __init__(self, summary, result, cfg) -> None:  # noqa: ANN001
        self.summary = summary  # tunelab.rundir.RunSummary
        self.result = result  # tunelab.training.recipe.TrainResult: the in-memory trained model and its data
        self.cfg = cfg
        self.path = Path(summary.run_dir)


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """run_pipeline on the 5-label CSV: lr 1e-2, 6 epochs, evaluation against the base included."""
    import tunelab.pipeline
    from tunelab.training.recipe import train

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


# name -> (lora config, seed of its random weights): two ranks, and one adapter on q/v only.
ADAPTERS = {
    "r4": ({"rank": 4, "alpha": 8}, 1),
    "r8": ({"rank": 8, "alpha": 8}, 2),
    "qv": ({"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, 3),
}


@pytest.fixture(scope="session")
def adapter_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three finished tiny runs whose adapters change the answers (serving tests): two ranks, two target sets.

    Trained for one short epoch (so each run is whole), then given random weights: LoRA's B starts at zero,
    and a barely trained adapter would answer like the base, hiding a request served with the wrong adapter.
    """
    import tunelab as tl
    from serving import randomize_adapter

    folder = tmp_path_factory.mktemp("adapters")
    csv_path = write_csv(folder / "intents.csv", classification_rows())
    runs = {}
    for name, (lora, seed) in ADAPTERS.items():
        cfg = make_run_config(tiny_model_dir, csv_path, folder / name, lora=lora, train={"epochs": 1, "val_rows": 0})
        run = tl.train(cfg)
        randomize_adapter(run.path, seed)
        runs[name] = run.path
    return runs


