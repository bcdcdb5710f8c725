"""tunelab.config: strict keys, overrides, path resolution, and the demo config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import DEFAULT_MODEL, RunConfig, load_config
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
model: some-model
data:
  path: data/train.csv
  format: csv
lora:
  rank: 4
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_relative_data_path_resolved_against_the_yaml(tmp_path, monkeypatch):
    cfg_path = write(tmp_path / "configs" / "run.yaml", MINIMAL)
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    cfg = load_config(cfg_path)
    assert cfg.data.path == (tmp_path / "configs" / "data" / "train.csv").resolve()
    assert cfg.data.path.is_absolute()
    assert cfg.lora.rank == 4
    assert cfg.eval.compare_base is True and cfg.train.grad_accumulation == 1  # defaults filled in
    # The three a new user would otherwise have to guess are chosen per run (train/auto.py), as OpenAI's API does.
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == ("auto", "auto", "auto")
    assert cfg.train.model_fields_set == set()  # ... and known to be defaults, not set in the config
    assert cfg.model.name == "some-model" and cfg.model.kernels == "tunelab"


def test_absolute_data_path_kept(tmp_path):
    data = tmp_path / "elsewhere" / "x.csv"
    cfg = load_config(write(tmp_path / "run.yaml", f"data: {{path: {data}}}\n"))
    assert cfg.data.path == data
    assert cfg.model.name == DEFAULT_MODEL
    assert cfg.data.format == "auto"  # detected from the file, and said in the run log


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path / "run.yaml", MINIMAL + "trian:\n  epochs: 2\n")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    assert "trian" in str(info.value)
    assert info.value.where == str(path)

    path = write(tmp_path / "run2.yaml", MINIMAL.replace("rank: 4", "rank: 4\n  rnak: 8"))
    with pytest.raises(TunelabError, match=r"lora\.rnak"):
        load_config(path)


def test_bad_value_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path / "run.yaml", MINIMAL.replace("rank: 4", "rank: 0"))
    with pytest.raises(TunelabError, match=r"lora\.rank"):
        load_config(path)
    bad_split = MINIMAL.replace("format: csv", "format: csv\n  split: [0.5, 0.2, 0.2]")
    with pytest.raises(TunelabError, match="sum to 1"):
        load_config(write(tmp_path / "split.yaml", bad_split))


def test_overrides_set_style(tmp_path):
    path = write(tmp_path / "run.yaml", MINIMAL)
    cfg = load_config(path, {"lora.rank": 8, "train.learning_rate": "1e-3", "eval.max_rows": None, "data.path": "other.csv"})
    assert cfg.lora.rank == 8
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.eval.max_rows is None
    assert cfg.data.path == (tmp_path / "other.csv").resolve()
    with pytest.raises(TunelabError, match=r"lora\.bogus"):
        load_config(path, {"lora.bogus": 1})


def test_override_into_an_empty_section(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  path: x.csv\nlora:\n  # rank: 16\n")
    cfg = load_config(path, {"lora.rank": 8})
    assert cfg.lora.rank == 8


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(TunelabError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path / "bad.yaml", "data:\n  path: [unclosed\n")
    with pytest.raises(TunelabError, match="invalid YAML") as info:
        load_config(path)
    assert info.value.where.startswith(f"{path}:")
    with pytest.raises(TunelabError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_demo_config_is_valid():
    demo = REPO / "examples" / "banking77" / "demo.yaml"
    cfg = load_config(demo)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == DEFAULT_MODEL
    # The demo pins what its numbers depend on, so a change of tunelab's defaults cannot change them.
    assert {"epochs", "batch_size", "learning_rate"} <= cfg.train.model_fields_set
    assert cfg.data.path == (demo.parent / "train.csv").resolve()
    assert cfg.data.path.is_file()
    header = cfg.data.path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert cfg.data.input_column in header and cfg.data.output_column in header


def test_every_problem_is_reported_at_once_with_the_allowed_values(tmp_path):
    path = write(tmp_path / "run.yaml", "tuning: lorra\ndata: {path: x.csv, formt: csv}\n"
                                        "train: {epochs: -1, batch_size: big}\nmodel: {name: m, kernels: fast}\n")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 5 problems: ")
    assert "key 'tuning': 'lorra': should be 'lora' or 'full'" in message
    assert "unknown key 'data.formt' (the keys of data: path, format," in message
    assert "key 'train.epochs': -1: must be > 0 or 'auto'" in message
    assert "key 'train.batch_size': 'big': should be a valid integer or 'auto'" in message
    assert "key 'model.kernels': 'fast': should be 'tunelab' or 'reference'" in message


def test_the_model_is_a_name_or_a_section(tmp_path):
    short = load_config(write(tmp_path / "a.yaml", "model: my-model\n"))
    long = load_config(write(tmp_path / "b.yaml", "model: {name: my-model, kernels: reference}\n"))
    assert short.model.name == long.model.name == "my-model"
    assert (short.model.kernels, long.model.kernels) == ("tunelab", "reference")
    assert RunConfig.model_validate_json(long.model_dump_json()) == long  # config.json reads back


def test_each_default_is_defined_once():
    """The split and the near-duplicate threshold live in one place each; the CLI and the functions read them."""
    import inspect

    from tunelab.cli import data as cli_data
    from tunelab.config import DEFAULT_SPLIT, DataConfig
    from tunelab.data import split, split_files
    from tunelab.data.quality.near_dup import DEFAULT_THRESHOLD

    assert DataConfig().split == DEFAULT_SPLIT
    assert inspect.signature(split.split_conversations).parameters["fractions"].default is DEFAULT_SPLIT
    assert inspect.signature(split_files.split_file).parameters["fractions"].default is DEFAULT_SPLIT
    assert inspect.signature(cli_data.data_split).parameters["fractions"].default == "0.8,0.1,0.1"
    assert inspect.signature(cli_data.data_lint).parameters["threshold"].default is DEFAULT_THRESHOLD
