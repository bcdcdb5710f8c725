"""tunelab.training.budget: a run over its time budget says so from its first steps, with what would fit."""

from __future__ import annotations

from tests.helpers import classification_rows, make_run_config, run_log, write_csv

from tunelab.training.budget import PROBE_STEPS, budget_check


def test_no_budget_no_check():
    assert budget_check(None, 1.0, 1000, 100, "fp32") is None


def test_the_estimate_comes_after_the_warm_up_and_the_timed_steps_and_only_once():
    # 10 s of setup; 100 rows, 40,000 tokens; each step 400 tokens in 2 s (200 tokens/s): 200 s to train.
    check = budget_check(2, 10.0, 40_000, 100, "fp32")
    said = [check.observe(30.0 if i == 0 else 2.0, 400) for i in range(PROBE_STEPS + 5)]
    assert said[: PROBE_STEPS] == [None] * PROBE_STEPS  # the warm-up step (30 s) is not the machine's speed
    message = said[PROBE_STEPS]
    assert said[PROBE_STEPS + 1 :] == [None] * 4 and check.said == message
    # spent 36 s, 38,400 tokens left at 200 tokens/s = 192 s, plus 10 s of setup: 238 s = ~4.0 min
    assert "~4.0 min" in message and "train.time_budget_minutes 2" in message and "200 tokens/s" in message
    assert "200 tokens/s over steps 2-4 in fp32" in message
    # (120 - 10) / 228 of the rows, to a round hundred below: none of 100 rows
    assert "no smaller run of this data fits" in message


def test_the_advice_scales_the_rows_to_the_budget():
    check = budget_check(10, 30.0, 240_000, 6_000, "fp32")
    said = [check.observe(1.6, 1280) for _ in range(PROBE_STEPS + 1)][-1]  # 800 tokens/s: ~300 s to train
    assert said is None  # 330 s fits 600
    slow = budget_check(10, 30.0, 240_000, 6_000, "fp32")
    said = [slow.observe(4.0, 1280) for _ in range(PROBE_STEPS + 1)][-1]  # 320 tokens/s: ~750 s to train
    # 570 s of room / 750 s of training x 6,000 rows = 4,560 -> 4,500
    assert "`--set data.max_train_rows=4500` fits (4,500 of 6,000 rows" in said


def test_a_run_over_its_budget_says_so_in_its_log_and_finishes(tiny_model_dir, tmp_path):
    from tunelab.training.recipe import train

    csv = write_csv(tmp_path / "data.csv", classification_rows())
    cfg = make_run_config(tiny_model_dir, csv, tmp_path / "runs", train={"time_budget_minutes": 1e-4, "batch_size": 2})
    with run_log() as lines:
        result = train(cfg)
    over = [line for line in lines if line.startswith("time budget:")]
    assert len(over) == 1 and "train.time_budget_minutes 0.0001" in over[0] and "Ctrl-C" in over[0]
    assert result.run.path.is_dir()

