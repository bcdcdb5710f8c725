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
    assert cfg.train.batch_size == 16 and cfg.eval.compare_base is True  # defaults filled in


def test_absolute_data_path_kept(tmp_path):
    data = tmp_path / "elsewhere" / "x.csv"
    cfg = load_config(write(tmp_path / "run.yaml", f"data: {{path: {data}}}\n"))
    assert cfg.data.path == data
    assert cfg.model == DEFAULT_MODEL


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
    assert cfg.model == DEFAULT_MODEL
    assert cfg.data.path == (demo.parent / "train.csv").resolve()
    assert cfg.data.path.is_file()
    header = cfg.data.path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert cfg.data.input_column in header and cfg.data.output_column in header
