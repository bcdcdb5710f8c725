"""bench/eval_time.py: a smoke run on a tiny trained run, which must agree on every loss and read the base back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_eval_time_runs_and_both_ways_give_the_same_loss(trained_run, tmp_path):
    out = tmp_path / "eval_time.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(BENCH / "eval_time.py"), str(trained_run.path), "--rounds", "1",
               "--precision", "fp32", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU: " in proc.stdout and "a later run's evaluation" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["loss"]) == {"finetune", "base_zero_shot", "base_few_shot"}
    for figures in result["loss"].values():
        assert abs(figures["loss_shared"] - figures["loss_separate"]) <= 1e-4 * abs(figures["loss_separate"])
    assert "read back: base_zero_shot, base_few_shot" in proc.stdout
