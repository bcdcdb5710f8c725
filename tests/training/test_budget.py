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


def test_the_validations_are_timed_once_at_the_estimate_and_counted():
    timed = []

    def validations() -> float:
        timed.append(1)
        return 90.0

    # 30 s of setup, 300 s of training and 90 s of validations (7.0 min) fit 7.5 minutes.
    check = budget_check(7.5, 30.0, 240_000, 6_000, "fp32", validations=validations)
    said = [check.observe(1.6, 1280) for _ in range(PROBE_STEPS + 3)]
    assert said == [None] * (PROBE_STEPS + 3) and timed == [1]  # asked once, at the estimate
    tight = budget_check(6, 30.0, 240_000, 6_000, "fp32", validations=lambda: 90.0)
    message = [tight.observe(1.6, 1280) for _ in range(PROBE_STEPS + 1)][-1]
    assert message is not None and "~7.0 min" in message and "(validations ~1.5 min of it)" in message
    alone = budget_check(6, 30.0, 240_000, 6_000, "fp32")
    assert [alone.observe(1.6, 1280) for _ in range(PROBE_STEPS + 1)][-1] is None  # 5.5 min: fits without them
    # the rows that fit scale training and validations alike: 330 s of room / 390 s x 6,000 = 5,076 -> 5,000
    assert "`--set data.max_train_rows=5000` fits" in message


def test_without_a_validation_probe_the_message_says_they_are_left_out():
    check = budget_check(1, 30.0, 240_000, 6_000, "fp32")
    message = [check.observe(4.0, 1280) for _ in range(PROBE_STEPS + 1)][-1]
    assert "(validations left out: several processes)" in message


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
    assert "validations ~" in over[0]  # one process: its validations were timed and counted
    assert result.run.path.is_dir()


def test_time_validations_is_one_pass_times_the_validations_of_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.training import budget
    from tunelab.training.setup import setup

    csv = write_csv(tmp_path / "data.csv", classification_rows())
    for eval_every, expected in ((0, 1), (1, None), (2, None)):
        cfg = make_run_config(tiny_model_dir, csv, tmp_path / "runs", train={"batch_size": 2, "eval_every": eval_every})
        s = setup(cfg)
        monkeypatch.setattr(budget, "time_validation_pass", lambda _s: 3.0)
        count = expected or (s.steps - 1) // eval_every + 1  # every eval_every steps before the last, and the last
        assert budget.time_validations(s) == 3.0 * count
        monkeypatch.undo()
    one_pass = budget.time_validation_pass(s)
    assert one_pass > 0

