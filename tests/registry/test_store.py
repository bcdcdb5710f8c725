"""tunelab.registry.store and `tunelab models ...`: register, resolve, promote through the gate, roll back, delete, log."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers import comparison, eval_json, run_data
from tunelab.cli.models import diff_records, models_app
from tunelab.errors import TunelabError
from tunelab.evaluation.result import EvalResult
from tunelab.registry.store import INDEX, Registry, eval_summary


def good_eval(**comparisons: dict[str, Any]) -> dict[str, Any]:
    """An eval.json (docs/eval-format.md) that passes the gate, unless `comparisons` say otherwise."""
    return eval_json(**comparisons)


def make_run(folder: Path, tokenizer, *, eval_json: dict | None = None, rank: int = 4,
             data_sha: str = "d" * 64) -> Path:
    """A finished run directory as `tunelab train` lays it out (manifest last), without training."""
    from tunelab.rundir import RunDir  # imports torch: only where a run is built

    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights %d" % rank)
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "config.json").write_text(json.dumps({"model": "tiny", "lora": {"rank": rank, "alpha": 2 * rank},
                                                    "train": {"learning_rate": 1e-3}}))
    (folder / "data.json").write_text(json.dumps(run_data(sha256=data_sha)))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if eval_json is not None:
        (folder / "eval.json").write_text(json.dumps(eval_json))
    (folder / "checkpoints" / "step-0000001").mkdir(parents=True)
    (folder / "checkpoints" / "step-0000001" / "state.json").write_text("{}")
    RunDir(folder).write_manifest()
    return folder


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def run(tmp_path: Path, tiny_tokenizer) -> Path:
    return make_run(tmp_path / "runs" / "good", tiny_tokenizer, eval_json=good_eval())


@pytest.fixture
def full_run(make_config, classification_csv) -> Path:
    """A real run with tuning: full on the tiny model (a quarter epoch), evaluated."""
    from tunelab.pipeline import run_pipeline

    cfg = make_config(classification_csv, train={"epochs": 0.25}, eval={"max_rows": 4, "forgetting_probe": False})
    return Path(run_pipeline(cfg.model_copy(update={"tuning": "full"})).run_dir)


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- register


def test_register_copies_a_real_run_that_survives_deleting_runs(trained_run, tmp_path, reg):
    from transformers import AutoTokenizer

    from tunelab.model.template_canary import template_fingerprint

    copy = shutil.copytree(trained_run.path, tmp_path / "runs" / trained_run.path.name)
    manifest = json.loads((copy / "manifest.json").read_text())
    data = json.loads((copy / "data.json").read_text())
    canary = template_fingerprint(AutoTokenizer.from_pretrained(copy / "tokenizer"))
    v = reg.register(copy, "banking")
    assert v.ref == "banking@1" and v.path == reg.root / "banking" / "1"
    shutil.rmtree(tmp_path / "runs")  # the registry holds a copy, not a pointer

    v = reg.resolve("banking")
    kept = {f for f in manifest["files"] if not f.startswith("checkpoints/")}
    assert any(f.startswith("checkpoints/") for f in manifest["files"])  # there was something to leave behind
    assert files_under(v.path) == kept | {"manifest.json", "version.json"}
    for rel in kept:
        assert hashlib.sha256((v.path / rel).read_bytes()).hexdigest() == manifest["files"][rel]["sha256"], rel
    r = v.record
    assert r["base_model"] == data["base_model"] and r["base_model"]["weights"]
    assert r["data"]["sha256"] == data["sha256"]
    assert r["config"] == json.loads((v.path / "config.json").read_text())
    assert r["source"] == str(copy.resolve())
    template = (v.path / "tokenizer" / "chat_template.jinja").read_text()
    assert r["tokenizer"]["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert r["tokenizer"]["eos_token"] == "<|im_end|>"
    assert r["tokenizer"]["eos_token_sha256"] == hashlib.sha256(b"<|im_end|>").hexdigest()
    assert r["tokenizer"]["canary_sha256"] == canary
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["created"])
    # The fine-tune's primary metric is what the registry records.
    ev = EvalResult.read(v.path / "eval.json")
    assert r["eval"] == eval_summary(ev)
    value = ev.contenders["finetune"].metrics[ev.metric]
    assert value is not None and r["eval"]["contenders"]["finetune"]["value"] == value
    assert json.loads((v.path / "version.json").read_text()) == r
    assert reg.register(v.path, "banking").ref == "banking@2"  # a registered version is itself a whole run


def test_unfinished_tampered_and_incomplete_runs_are_refused(run, reg, tmp_path):
    (run / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(TunelabError, match=r"is not a finished run \(no manifest.json.*fix: finish it with "
                                           r"`tunelab train --resume"):
        reg.register(run, "m")
    (tmp_path / "manifest.json").rename(run / "manifest.json")

    original = (run / "config.json").read_text()
    (run / "config.json").write_text(original.replace('"rank": 4', '"rank": 5'))
    with pytest.raises(TunelabError) as info:
        reg.register(run, "m")
    assert str(info.value).startswith(f"{run / 'config.json'}: config.json does not match its sha256 in manifest.json")
    (run / "config.json").write_text(original)

    (run / "metrics.jsonl").unlink()
    with pytest.raises(TunelabError, match="metrics.jsonl is listed in manifest.json but missing"):
        reg.register(run, "m")
    assert reg.versions() == []
    assert list((reg.root / ".staging").iterdir()) == []  # nothing half-copied left behind
    assert not (reg.root / "m").exists()


@pytest.mark.parametrize("name", ["Banking", "-lead", ".hidden", "a/b", "a@1", "", "x" * 101])
def test_bad_names_are_refused_with_the_rule(run, reg, name):
    with pytest.raises(TunelabError, match="is not a valid model name.*fix: use lowercase letters"):
        reg.register(run, name)


def test_resolve_by_number_latest_and_alias_and_errors_that_list_what_exists(run, reg, tiny_tokenizer, tmp_path):
    reg.register(run, "m")
    reg.register(run, "m")
    reg.register(run, "other")
    assert reg.resolve("m").version == 2 and reg.resolve("m@latest").version == 2 and reg.resolve("m@1").version == 1
    with pytest.raises(TunelabError, match=r"m@7 does not exist \(fix: versions of m: 1, 2\)"):
        reg.resolve("m@7")
    with pytest.raises(TunelabError, match="no model 'nope' in the registry.*registered names: m, other"):
        reg.resolve("nope")
    with pytest.raises(TunelabError, match="m has no alias 'production'.*aliases of m: none"):
        reg.resolve("m@production")
    with pytest.raises(TunelabError, match="is not NAME, NAME@VERSION or NAME@ALIAS"):
        reg.resolve("m@Prod!")
    reg.promote("m@1")
    v = reg.resolve("m@production")
    assert (v.version, v.aliases) == (1, ("production",))
    assert [(x.ref, x.aliases) for x in reg.versions()] == [("m@1", ("production",)), ("m@2", ()), ("other@1", ())]


# ---------------------------------------------------------------------- gate


def test_a_run_with_an_older_eval_json_is_refused_with_the_command_that_rewrites_it(reg, tmp_path, tiny_tokenizer):
    old = {"summary": {"task": "classification", "accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "test_rows": 20}}
    with pytest.raises(TunelabError, match=r"eval.json: not a tunelab-eval/2 evaluation.*tunelab eval"):
        reg.register(make_run(tmp_path / "old", tiny_tokenizer, eval_json=old), "m")


def test_a_full_fine_tune_registers(reg, full_run):
    """A fully tuned run has model/ instead of adapter/: it registers (it used to be refused, with a wrong fix)."""
    v = reg.register(full_run, "full")
    assert (v.path / "model" / "config.json").is_file() and not (v.path / "adapter").exists()
    assert v.record["config"]["tuning"] == "full" and v.record["eval"]["task"] == "classification"


def test_a_run_with_neither_adapter_nor_model_is_refused(reg, run):
    import shutil as sh

    sh.rmtree(run / "adapter")
    from tunelab.rundir import RunDir

    RunDir(run).write_manifest()
    with pytest.raises(TunelabError, match="does not list adapter/adapter_config.json or model/config.json"):
        reg.register(run, "m")


# ---------------------------------------------------------------------- promote / rollback / delete / log


def test_promote_is_gated_and_force_needs_and_records_a_reason(reg, tmp_path, tiny_tokenizer):
    bad = make_run(tmp_path / "bad", tiny_tokenizer, eval_json=good_eval(base_zero_shot=comparison(-0.2)))
    unevaluated = make_run(tmp_path / "none", tiny_tokenizer, eval_json=None)
    reg.register(bad, "m")
    reg.register(unevaluated, "m")
    with pytest.raises(TunelabError) as info:
        reg.promote("m@1")
    message = str(info.value)
    assert message.startswith(f"{reg.root / 'm' / '1' / 'eval.json'}: m@1 may not become m@production: "
                              "not significantly better than base_zero_shot: accuracy delta -0.2000")
    assert "--force --reason" in message
    with pytest.raises(TunelabError, match="no eval.json"):
        reg.promote("m@2", alias="staging")
    assert reg.aliases("m") == {}
    with pytest.raises(TunelabError, match="--force needs --reason"):
        reg.promote("m@1", force=True)
    with pytest.raises(TunelabError, match="--force needs --reason"):
        reg.promote("m@1", force=True, reason="  ")

    v, previous, verdict = reg.promote("m@1", force=True, reason="hotfix, eval rerun tomorrow")
    assert (v.ref, previous, verdict.ok) == ("m@1", None, False)
    assert reg.aliases("m") == {"production": 1}
    event = reg.events("m")[-1]
    assert (event.action, event.version, event.alias, event.reason) == ("promote", 1, "production",
                                                                       "hotfix, eval rerun tomorrow")
    assert event.detail["forced"] is True and event.detail["overridden"] == verdict.reasons
    assert event.detail["overridden"][0].startswith("not significantly better than base_zero_shot")


def test_rollback_walks_back_through_the_alias_history(reg, run):
    for _ in range(3):
        reg.register(run, "m")
    assert reg.promote("m@1")[1] is None
    assert reg.promote("m@2", reason="better")[1] == 1
    assert reg.promote("m@3")[1] == 2
    assert reg.promote("m@3")[1] == 3  # already there: no change, no history entry
    reg.promote("m@1", alias="staging")
    assert reg.rollback("m") == (3, 2)
    assert reg.rollback("m", reason="2 is slow too") == (2, 1)
    assert reg.aliases("m") == {"production": 1, "staging": 1}
    with pytest.raises(TunelabError, match=r"nothing to roll m@production back to: it points at m@1, its first "
                                           r"promotion.*tunelab models log m"):
        reg.rollback("m")
    with pytest.raises(TunelabError, match="nothing to roll m@canary back to: it was never set"):
        reg.rollback("m", alias="canary")
    with pytest.raises(TunelabError, match="'latest' is reserved"):
        reg.promote("m@1", alias="latest")

    events = reg.events("m")
    assert [(e.action, e.version, e.alias) for e in events] == [
        ("register", 1, None), ("register", 2, None), ("register", 3, None),
        ("promote", 1, "production"), ("promote", 2, "production"), ("promote", 3, "production"),
        ("promote", 1, "staging"), ("rollback", 2, "production"), ("rollback", 1, "production")]
    assert events[4].reason == "better" and events[-1].reason == "2 is slow too"
    assert events[-1].detail == {"from": 2} and events[4].detail["from"] == 1 and events[4].detail["gate_ok"] is True
    assert all(e.actor and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e.time) for e in events)


def test_delete_refuses_an_aliased_version_and_never_reuses_its_number(reg, run):
    for _ in range(3):
        reg.register(run, "m")
    reg.promote("m@1")
    reg.promote("m@2")
    with pytest.raises(TunelabError, match=r"m@2 is what m@production points at.*--force"):
        reg.delete("m@2")
    with pytest.raises(TunelabError, match="does not name one version"):
        reg.delete("m")
    assert (reg.root / "m" / "2").is_dir()

    reg.delete("m@1")  # in production's history, not current: leaves the history, so no rollback lands on it
    assert not (reg.root / "m" / "1").exists()
    with pytest.raises(TunelabError, match="nothing to roll m@production back to"):
        reg.rollback("m")
    reg.delete("m@2", force=True, reason="leaks PII")
    assert reg.aliases("m") == {} and not (reg.root / "m" / "2").exists()
    assert reg.register(run, "m").ref == "m@4"  # 1 and 2 are gone, but their numbers stay taken
    assert [v.version for v in reg.versions("m")] == [3, 4]
    last = reg.events("m")[-2]
    assert (last.action, last.version, last.reason, last.detail) == ("delete", 2, "leaks PII",
                                                                     {"aliases_removed": ["production"]})
    assert list((reg.root / ".staging").iterdir()) == []


def test_diff_names_config_data_and_metric_differences(reg, tmp_path, tiny_tokenizer):
    a = make_run(tmp_path / "a", tiny_tokenizer, eval_json=good_eval(), rank=4)
    changed = good_eval()
    changed["contenders"]["finetune"]["metrics"]["accuracy"] = 0.95
    b = make_run(tmp_path / "b", tiny_tokenizer, eval_json=changed, rank=8, data_sha="e" * 64)
    va, vb = reg.register(a, "m"), reg.register(b, "m")
    rows = {key: (x, y) for key, x, y in diff_records(va, vb)}
    assert rows == {"config.lora.rank": (4, 8), "config.lora.alpha": (8, 16), "data.sha256": ("d" * 64, "e" * 64),
                    "eval.contenders.finetune.value": (0.9, 0.95)}
    assert diff_records(va, va) == []
    c = make_run(tmp_path / "c", tiny_tokenizer, eval_json=None)
    rows = {key: (x, y) for key, x, y in diff_records(va, reg.register(c, "m"))}
    assert rows["eval.metric"] == ("accuracy", "(absent)") and rows["eval"] == ("(absent)", None)


def _register_when_released(root: str, run_dir: str, barrier, results) -> None:
    import time

    import transformers  # noqa: F401 - the slow import before the barrier, so the registrations really race

    import tunelab.registry.store

    # Widen the race window: the clock is read inside the index transaction, so each registration holds
    # it for ~0.6 s. Without the write lock taken up front, overlapping transactions then fail or collide.
    real_now = tunelab.registry.store._now
    tunelab.registry.store._now = lambda: (time.sleep(0.3), real_now())[1]
    barrier.wait(timeout=120)
    results.put(Registry(Path(root)).register(Path(run_dir), "race").version)


def test_concurrent_registrations_get_distinct_whole_versions(run, reg):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_register_when_released, args=(str(reg.root), str(run), barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [1, 2, 3, 4]
    for v in reg.versions("race"):
        assert files_under(v.path) == set(v.record["files"]) | {"manifest.json", "version.json"}
        for rel, digest in v.record["files"].items():
            assert hashlib.sha256((v.path / rel).read_bytes()).hexdigest() == digest
    assert [e.version for e in reg.events("race")] == sorted(e.version for e in reg.events("race"))
    assert sorted(p.name for p in (reg.root / "race").iterdir()) == ["1", "2", "3", "4"]


# ---------------------------------------------------------------------- CLI


def test_cli_session(run, reg, tmp_path, tiny_tokenizer):
    cli = CliRunner()
    at = ["--registry", str(reg.root)]

    def ok(*args: str) -> str:
        result = cli.invoke(models_app, [*args, *at], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    assert ok("register", str(run), "--name", "m", "--note", "first") == "m@1\n"
    worse = make_run(tmp_path / "worse", tiny_tokenizer,
                     eval_json=good_eval(base_zero_shot=comparison(0.01, False), base_few_shot=comparison(0.1)))
    assert ok("register", str(worse), "--name", "m") == "m@2\n"
    listing = ok("list")
    assert re.search(r"m\s+1\s+accuracy 0\.900 \[0\.850, 0\.950\]\s+\d{4}-", listing)
    assert ok("promote", "m@1", "--reason", "beats base").strip() == "m@production -> m@1 (was unset)"
    assert re.search(r"m\s+1\s+production\s+accuracy", ok("list", "m"))

    shown = json.loads(ok("show", "m@production", "--json"))
    assert shown["ref"] == "m@1" and shown["aliases"] == ["production"] and shown["note"] == "first"
    assert shown["gate"] == {"ok": True, "reasons": []} and shown["tokenizer"]["eos_token"] == "<|im_end|>"
    text = ok("show", "m@2")
    # Brackets are printed, not read as rich markup (a reason list, a CI).
    assert "[not significantly better than base_zero_shot: accuracy delta +0.0100" in text
    assert re.search(r"eval\.contenders\.finetune\.ci\s+\[0\.85, 0\.95\]", text)
    assert "config.lora.rank" in text and "tokenizer.canary_sha256" in text

    refused = cli.invoke(models_app, ["promote", "m@2", *at])
    assert isinstance(refused.exception, TunelabError) and "may not become m@production" in str(refused.exception)
    forced = ok("promote", "m@2", "--force", "--reason", "demo tomorrow")
    assert forced.endswith("m@production -> m@2 (was m@1)\n") and "gate overridden" in forced
    assert ok("rollback", "m", "--reason", "bad").strip() == "m@production -> m@1 (was m@2)"

    diff = json.loads(ok("diff", "m@1", "m@2", "--json"))
    assert {d["key"] for d in diff["differences"]} == {"eval.comparisons.base_zero_shot.delta",
                                                       "eval.comparisons.base_zero_shot.delta_ci",
                                                       "eval.comparisons.base_zero_shot.p_value",
                                                       "eval.comparisons.base_zero_shot.significant",
                                                       "eval.contenders.base_zero_shot.value",
                                                       "eval.contenders.base_zero_shot.ci"}
    assert "eval.comparisons.base_zero_shot.significant" in ok("diff", "m@1", "m@2")

    log = json.loads(ok("log", "m", "--json"))
    assert [e["action"] for e in log] == ["register", "register", "promote", "promote", "rollback"]
    assert log[3]["reason"] == "demo tomorrow" and log[3]["detail"]["forced"] is True
    table = ok("log", "m")
    assert "demo tomorrow" in table and "rollback" in table and "beats base" in table
    assert ok("delete", "m@2").strip() == "deleted m@2"
    assert (reg.root / INDEX).is_file()
