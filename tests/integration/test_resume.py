"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed equals an uninterrupted one, bitwise."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.rundir import RunDir
from tunelab.training.checkpoint import complete_checkpoints
from tunelab.training.recipe import train

TRAIN = {"epochs": 30, "batch_size": 4, "learning_rate": 5e-3, "checkpoint_every": 5, "keep_checkpoints": 3,
         "val_rows": 0}


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    last = complete_checkpoints(run)[-1]
    return {**{f"w.{k}": v for k, v in load_file(last / "trainable.safetensors").items()},
            **{f"o.{k}": v for k, v in load_file(last / "optimizer.safetensors").items()}}


def _examples(run: Path) -> list[tuple[int, str]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["examples"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    from helpers import classification_rows, make_run_config, write_csv

    tmp = tmp_path_factory.mktemp("resume")
    csv = write_csv(tmp / "intents.csv", classification_rows())
    cfg = make_run_config(tiny_model_dir, csv, tmp / "reference", train=TRAIN, eval={"compare_base": False})
    result = train(cfg)
    return cfg, result.run.path


def _start_and_interrupt(cfg, tmp_path: Path, sig: signal.Signals) -> tuple[Path, subprocess.CompletedProcess]:
    """Run `tunelab train` in a subprocess; once a checkpoint exists, send `sig` to it."""
    out = tmp_path / "runs"
    cfg = cfg.model_copy(update={"output_dir": out})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(out.glob("*")) if out.is_dir() else []
        if runs and complete_checkpoints(runs[0]):
            run = runs[0]
            break
        time.sleep(0.01)
    if run is None or proc.poll() is not None:
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"the run finished or failed before it could be interrupted:\n{stderr[-3000:]}")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return run, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    cfg, reference = uninterrupted
    run, done = _start_and_interrupt(cfg, tmp_path, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    steps_before = _examples(run)[-1][0]
    total = _examples(reference)[-1][0]
    assert 0 < steps_before < total  # really interrupted mid-run

    train(RunDir(run).config(), resume=run)
    ours, ref = _final_state(run), _final_state(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key  # bitwise, weights and AdamW moments
    assert _examples(run) == _examples(reference)  # the same examples in the same order, every step once


def test_sigterm_checkpoints_and_exits_then_resumes(uninterrupted, tmp_path):
    cfg, reference = uninterrupted
    run, done = _start_and_interrupt(cfg, tmp_path, signal.SIGTERM)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "resume with: tunelab train --resume" in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr
    stopped_at = _examples(run)[-1][0]
    assert int(complete_checkpoints(run)[-1].name.split("-")[1]) == stopped_at  # checkpoint at the stop

    train(RunDir(run).config(), resume=run)
    ours, ref = _final_state(run), _final_state(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_half_written_checkpoints_are_never_picked(uninterrupted, tmp_path):
    _, reference = uninterrupted
    root = reference / "checkpoints"
    newest = complete_checkpoints(reference)[-1]
    (root / ".step-9999999.tmp").mkdir()  # a crash while writing
    (root / ".step-9999999.tmp" / "trainable.safetensors").write_bytes(b"partial")
    (root / "step-9999998").mkdir()  # renamed but without its checkpoint.json (cannot happen, still ignored)
    assert complete_checkpoints(reference)[-1] == newest
    assert len(complete_checkpoints(reference)) == TRAIN["keep_checkpoints"]


def test_resume_refuses_a_data_order_other_than_the_one_trained(uninterrupted, tmp_path):
    # The order is rebuilt on resume, not saved: another seed gives the steps already trained other examples.
    _, reference = uninterrupted
    run = shutil.copytree(reference, tmp_path / "run")
    cfg = RunDir(run).config()
    other_seed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + 1})})
    with pytest.raises(TunelabError, match=r"metrics\.jsonl:\d+: step \d+ trained on other examples"):
        train(other_seed, resume=run)
