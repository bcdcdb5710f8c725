"""tunelab.plan: estimates from a measured probe, before any run directory exists."""

from __future__ import annotations

import json
import subprocess
import sys

from rich.console import Console

from tunelab.plan import make_plan


def test_plan_counts_the_run_and_writes_nothing(classification_csv, tmp_path, make_config):
    cfg = make_config(classification_csv)
    plan = make_plan(cfg, Console(stderr=True, quiet=True), probe_steps=2, price_per_hour=3.6)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written

    from tunelab.train.recipe import train

    result = train(cfg, Console(stderr=True, quiet=True))  # the real run, for comparison
    steps = [json.loads(x) for x in (result.run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert plan["steps"] == len(steps)
    assert plan["tokens"]["total"] == sum(s["tokens"] for s in steps)
    assert plan["train_rows_used"] == len(result.data.train)
    est = plan["estimate_seconds"]
    assert all(est[k] >= 0 for k in est) and est["train"] > 0
    assert est["total"] == sum(est[k] for k in ("setup", "train", "validation", "evaluation"))
    assert plan["cost"]["total"] == 3.6 * est["total"] / 3600
    assert plan["probe"]["steps"] == 2 and plan["probe"]["tokens"] > 0
    assert plan["peak_memory_mb"] > 0


def test_train_dry_run_prints_the_plan_as_json(classification_csv, tmp_path, make_config):
    import yaml

    cfg = make_config(classification_csv)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), "--dry-run", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["steps"] > 0 and plan["estimate_seconds"]["total"] > 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_plan_counts_a_dpo_run(make_config, tmp_path):
    """Preference pairs: tokens are both rows of every pair, as the run's steps count them."""
    from test_methods import _pairs_file

    from tunelab.train.recipe import train

    cfg = make_config(_pairs_file(tmp_path), data={"format": "chosen_rejected"},
                      train={"epochs": 1, "batch_size": 4, "eval_every": 0, "val_rows": 4})
    cfg = cfg.model_copy(update={"objective": "dpo"})
    plan = make_plan(cfg, Console(stderr=True, quiet=True), probe_steps=1)
    steps = [json.loads(x) for x in (train(cfg).run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert plan["objective"] == "dpo" and plan["steps"] == len(steps)
    assert plan["tokens"]["total"] == sum(s["tokens"] for s in steps)
    assert plan["estimate_seconds"]["train"] > 0 and plan["estimate_seconds"]["validation"] > 0


def test_plan_table_for_dpo_counts_per_pair(make_config, tmp_path):
    import yaml

    from test_methods import _pairs_file

    cfg = make_config(_pairs_file(tmp_path), data={"format": "chosen_rejected"}, train={"epochs": 1, "batch_size": 4})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_copy(update={"objective": "dpo"}).model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "tunelab", "plan", str(path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "/pair)" in out.stdout and "/example)" not in out.stdout
