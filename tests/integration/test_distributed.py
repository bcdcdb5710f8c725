"""Several processes (torch.distributed, gloo on CPU): 2 x batch b trains like 1 x batch 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import run_data
from tunelab.training.distributed import World, local_rows


def test_local_rows_split_a_global_micro_batch_without_overlap():
    rows = list(range(7))
    shares = [local_rows(rows, World(r, 2)) for r in range(2)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6]]
    assert local_rows([0], World(1, 2)) == []  # the caller stands in a weight-0 row
    assert local_rows(rows, World()) == rows


def test_parallel_choice_shards_full_tuning_and_refuses_to_shard_an_adapter(tmp_path):
    from tunelab.config import RunConfig
    from tunelab.errors import TunelabError
    from tunelab.training.setup import choose_parallel

    def cfg(tuning: str, parallel: str) -> RunConfig:
        return RunConfig.model_validate({"data": {"path": str(tmp_path / "d.jsonl")}, "tuning": tuning,
                                         "train": {"parallel": parallel}})

    two = World(0, 2)
    assert choose_parallel(cfg("full", "auto"), two) is True
    assert choose_parallel(cfg("lora", "auto"), two) is False
    assert choose_parallel(cfg("full", "ddp"), two) is False
    assert choose_parallel(cfg("full", "fsdp"), World()) is False  # one process: nothing to shard
    with pytest.raises(TunelabError, match="fsdp shards full fine-tuning") as e:
        choose_parallel(cfg("lora", "fsdp"), two)
    assert "train.parallel: ddp" in str(e.value)


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
    assert out.returncode == 0, "\n".join(line for line in out.stderr.splitlines() if line.startswith("[rank0]"))[-5000:]
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


def _full_config(tmp_path: Path, model_dir: Path, csv_path: Path, batch: int, parallel: str) -> Path:
    path = _config(tmp_path, model_dir, csv_path, batch)
    cfg = yaml.safe_load(path.read_text())
    cfg["tuning"] = "full"
    cfg["name"] = f"full-{parallel}-{batch}"
    cfg["output_dir"] = str(tmp_path / f"runs-full-{parallel}-{batch}")
    cfg["train"].update(learning_rate=1e-3, parallel=parallel, epochs=1)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fsdp_full_fine_tuning_matches_one_process_and_resumes_bitwise(tmp_path, tiny_model_dir, classification_csv):
    one = _train([str(_full_config(tmp_path, tiny_model_dir, classification_csv, 8, "auto"))])
    two = _train([str(_full_config(tmp_path, tiny_model_dir, classification_csv, 4, "fsdp")), "--nproc", "2"])

    a, b = _metrics(Path(one["run_dir"])), _metrics(Path(two["run_dir"]))
    steps_a, steps_b = [r for r in a if "loss" in r], [r for r in b if "loss" in r]
    assert len(steps_a) == len(steps_b) > 4
    for x, y in zip(steps_a, steps_b):
        assert y["examples"] == x["examples"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    assert [r["val_loss"] for r in b if "val_loss" in r] == pytest.approx([r["val_loss"] for r in a if "val_loss" in r], rel=1e-3)

    # The saved model is whole (gathered from the shards) and equals the one-process model's weights.
    from safetensors.torch import load_file

    run = Path(two["run_dir"])
    whole_one = load_file(Path(one["run_dir"]) / "model" / "model.safetensors")
    whole_two = load_file(run / "model" / "model.safetensors")
    assert whole_one.keys() == whole_two.keys(), (sorted(whole_one.keys() ^ whole_two.keys()))
    for k in whole_one:
        assert whole_two[k].shape == whole_one[k].shape
        torch.testing.assert_close(whole_two[k], whole_one[k], rtol=1e-3, atol=1e-4)

    # Resume under FSDP: drop the last checkpoint, resume with 2 processes, bitwise the same model.
    import shutil

    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    shutil.rmtree(checkpoints[-1])
    (run / "manifest.json").unlink()
    _train(["--resume", str(run), "--nproc", "2"])
    resumed = load_file(run / "model" / "model.safetensors")
    assert all(whole_two[k].equal(resumed[k]) for k in whole_two)


_SHARD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from tunelab.training import distributed
from tunelab.training.step import make_optimizer
world = distributed.init_from_env()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
total = sum(p.numel() for p in model.parameters())
module = distributed.wrap(model, world, shard=True)
local = sum(p.to_local().numel() for p in model.parameters())
optimizer, _ = make_optimizer(model, 1e-3, 0.0, 10, 0)  # builds over the shards
# One file per process: two processes printing to one pipe can interleave their lines.
open(f"{sys.argv[2]}/share-{world.rank}.json", "w").write(json.dumps({"rank": world.rank, "total": total, "local": local}))
distributed.shutdown(world)
"""


def test_fsdp_keeps_a_share_of_the_weights_on_each_process(tmp_path, tiny_model_dir):
    script = tmp_path / "shard.py"
    script.write_text(_SHARD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                          str(tiny_model_dir), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shares = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("share-*.json"))]
    assert len(shares) == 2
    total = shares[0]["total"]
    # Each process holds about half of every weight (dim-0 shards, the last one may be shorter).
    assert all(s["local"] <= total / 2 + 64 * 16 for s in shares)
    assert sum(s["local"] for s in shares) == total


def test_resume_restores_each_process_rng_so_dropout_replays(tmp_path, tiny_model_dir, classification_csv):
    # LoRA dropout draws from each process's own RNG, and the processes' streams part ways (their rows pad to
    # different widths), so resuming bitwise needs every process's RNG state, not only rank 0's.
    path = _config(tmp_path, tiny_model_dir, classification_csv, 4)
    cfg = yaml.safe_load(path.read_text())
    cfg["lora"]["dropout"] = 0.3
    cfg["train"].update(epochs=1, eval_every=0)
    path.write_text(yaml.safe_dump(cfg))
    run = Path(_train([str(path), "--nproc", "2"])["run_dir"])

    import shutil

    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(checkpoints) == 2  # checkpoint_every 5 and the end
    assert "rng.torch.1" in load_file(checkpoints[-1] / "optimizer.safetensors")
    shutil.rmtree(checkpoints[-1])
    (run / "manifest.json").unlink()
    _train(["--resume", str(run), "--nproc", "2"])
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(adapter[k].equal(resumed[k]) for k in adapter)


def test_resume_with_another_process_count_is_an_error_with_the_command(tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.training.recipe import require_same_processes

    (tmp_path / "data.json").write_text(json.dumps(run_data(processes=2)))
    require_same_processes(tmp_path, World(0, 2))  # the same count: fine
    with pytest.raises(TunelabError, match="trained with 2 process") as e:
        require_same_processes(tmp_path, World())
    assert f"--resume --nproc 2 {tmp_path}" in str(e.value) and "data.json" in str(e.value)
