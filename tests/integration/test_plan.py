"""tunelab.planning against the runs it plans: the same steps and tokens; the CLI's plan."""

from __future__ import annotations

import json

from helpers import cli, pairs_file
from tunelab.planning import make_plan


def test_plan_counts_the_run_and_writes_nothing(classification_csv, tmp_path, make_config):
    cfg = make_config(classification_csv)
    plan = make_plan(cfg, probe_steps=2, price_per_hour=3.6)

    from tunelab.training.recipe import train

    result = train(cfg)  # the real run, for comparison
    steps = [json.loads(x) for x in (result.run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert plan.steps == len(steps)
    assert plan.tokens.total == sum(s["tokens"] for s in steps)
    assert plan.data.train_rows_used == len(result.data.train)


def test_train_dry_run_prints_the_plan_as_json(classification_csv, tmp_path, make_config):
    import yaml

    cfg = make_config(classification_csv)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = cli("train", str(path), "--dry-run", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["steps"] > 0 and plan["estimate_seconds"]["total"] > 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_plan_counts_a_dpo_run(make_config, tmp_path):
    """Preference pairs: tokens are both rows of every pair, as the run's steps count them."""
    from tunelab.training.recipe import train

    cfg = make_config(pairs_file(tmp_path), data={"format": "chosen_rejected"},
                      train={"epochs": 1, "batch_size": 4, "eval_every": 0, "val_rows": 4})
    cfg = cfg.model_copy(update={"objective": "dpo"})
    plan = make_plan(cfg, probe_steps=1)
    steps = [json.loads(x) for x in (train(cfg).run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert plan.objective == "dpo" and plan.unit == "pair" and plan.steps == len(steps)
    assert plan.tokens.total == sum(s["tokens"] for s in steps)
    assert plan.estimate_seconds.train > 0 and plan.estimate_seconds.validation > 0


def test_plan_table_for_dpo_counts_per_pair(make_config, tmp_path):
    import yaml

    cfg = make_config(pairs_file(tmp_path), data={"format": "chosen_rejected"}, train={"epochs": 1, "batch_size": 4})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_copy(update={"objective": "dpo"}).model_dump(mode="json")))
    out = cli("plan", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "/pair)" in out.stdout and "/example)" not in out.stdout
