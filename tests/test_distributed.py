"""Several processes (torch.distributed, gloo on CPU): 2 x batch b trains like 1 x batch 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.train.distributed import World, local_rows


def test_local_rows_split_a_global_micro_batch_without_overlap():
    rows = list(range(7))
    shares = [local_rows(rows, World(r, 2)) for r in range(2)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6]]
    assert local_rows([0], World(1, 2)) == []  # the caller stands in a weight-0 row
    assert local_rows(rows, World()) == rows


def _config(tmp_path: Path, model_dir: Path, csv_path: Path, batch: int) -> Path:
    cfg = {
        "model": str(model_dir), "name": f"b{batch}", "output_dir": str(tmp_path / f"runs-{batch}"),
        "data": {"path": str(csv_path), "format": "csv", "input_column": "text", "output_column": "label",
                 "max_length": 64},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"precision": "fp32", "batch_size": batch, "epochs": 2, "learning_rate": 1e-2, "val_rows": 8,
                  "eval_every": 4, "warmup_ratio": 0.0, "threads": 1, "checkpoint_every": 5},
        "eval": {"compare_base": False, "forgetting_probe": False, "max_rows": 4},
    }
    path = tmp_path / f"cfg-{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tunelab", "train", *args, "--json"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_at_batch_b_match_one_process_at_batch_2b(tmp_path, tiny_model_dir, classification_csv):
    one = _train([str(_config(tmp_path, tiny_model_dir, classification_csv, 8))])
    two = _train([str(_config(tmp_path, tiny_model_dir, classification_csv, 4)), "--nproc", "2"])

    a, b = _metrics(Path(one["run_dir"])), _metrics(Path(two["run_dir"]))
    steps_a, steps_b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    assert len(steps_a) == len(steps_b) > 10
    for x, y in zip(steps_a, steps_b):
        assert y["examples"] == x["examples"]  # the same examples in every step
        assert y["tokens"] == x["tokens"] and y["trained_tokens"] == x["trained_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-4)
    val_a, val_b = [r["val_loss"] for r in a if "val_loss" in r], [r["val_loss"] for r in b if "val_loss" in r]
    assert val_b == pytest.approx(val_a, rel=1e-3)

    # Only rank 0 wrote: one run directory, whole, with its checkpoints.
    runs = list((tmp_path / "runs-4").iterdir())
    assert len(runs) == 1 and (runs[0] / "manifest.json").is_file()
    assert json.loads((runs[0] / "data.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir() if p.name.startswith("step-"))

    # Resume works the same with two processes: drop the last checkpoint and the finished marker, resume, and
    # the adapter comes out bitwise identical.
    import shutil

    from safetensors.torch import load_file

    run = runs[0]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    shutil.rmtree(checkpoints[-1])
    (run / "manifest.json").unlink()
    _train(["--resume", str(run), "--nproc", "2"])
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == resumed.keys()
    assert all(adapter[k].equal(resumed[k]) for k in adapter)
