"""What export refuses, each with the reason and the fix, before any model is loaded."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import assert_user_error, cli
from tunelab.config import ExportConfig
from tunelab.errors import TunelabError


def edited_copy(run: Path, folder: Path, **changes) -> Path:
    """A copy of a finished run whose adapter_config.json has `changes`, with its manifest rewritten."""
    from tunelab.rundir import RunDir

    copy = folder / "edited"
    shutil.copytree(run, copy)
    config_file = copy / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    RunDir(copy).write_manifest()
    return copy


def preflight(run, to: str, path: Path, **options):
    from tunelab.export.run import preflight as check

    return check(run, ExportConfig(to=to, path=path, **options))


@pytest.mark.parametrize("changes, reason", [
    ({"use_dora": True}, "DoRA has no GGUF-adapter form"),
    ({"modules_to_save": ["lm_head"]}, "replaces whole modules (lm_head)"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "targets embed_tokens"),
    ({"alpha_pattern": {"q_proj": 4}}, "per-module ranks or alphas"),
])
def test_adapters_without_a_gguf_adapter_form_are_refused_with_the_merged_fix(export_runs, tmp_path, changes, reason):
    run = edited_copy(export_runs["lora"], tmp_path, **changes)
    with pytest.raises(TunelabError, match="--to gguf") as info:
        preflight(run, "gguf-adapter", tmp_path / "a.gguf")
    assert reason in str(info.value)


def test_the_real_dora_run_is_refused_as_a_gguf_adapter(export_runs, tmp_path):
    with pytest.raises(TunelabError, match="DoRA"):
        preflight(export_runs["dora"], "gguf-adapter", tmp_path / "a.gguf")


def test_a_full_fine_tune_has_no_adapter_to_write(export_runs, tmp_path):
    with pytest.raises(TunelabError, match="no adapter to write.*--to gguf"):
        preflight(export_runs["full"], "gguf-adapter", tmp_path / "a.gguf")


def test_output_paths_are_checked(export_runs, tmp_path):
    with pytest.raises(TunelabError, match="does not end in .gguf"):
        preflight(export_runs["lora"], "gguf", tmp_path / "model.bin")
    (tmp_path / "taken").mkdir()
    with pytest.raises(TunelabError, match="exists.*--overwrite"):
        preflight(export_runs["lora"], "hf", tmp_path / "taken")
    preflight(export_runs["lora"], "hf", tmp_path / "taken", overwrite=True)


def test_unknown_sources_name_both_kinds(tmp_path):
    with pytest.raises(TunelabError, match="neither a run directory nor a registry reference"):
        preflight(str(tmp_path / "nope" / "run"), "hf", tmp_path / "out")
    with pytest.raises(TunelabError, match="no model 'nope' in the registry"):
        preflight("nope@production", "hf", tmp_path / "out")


def test_a_non_llama_base_is_refused_for_gguf():
    from transformers import Qwen2Config

    from tunelab.export.gguf_meta import require_llama

    with pytest.raises(TunelabError, match="writes the Llama architecture; this base is 'qwen2'.*--to hf"):
        require_llama(Qwen2Config(), where="base")


def test_an_unnamed_pre_tokenizer_is_refused_for_gguf():
    from tunelab.export.gguf_meta import pre_tokenizer_name

    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}}) is None


def test_bad_options_are_named():
    import tunelab as tl

    with pytest.raises(TunelabError, match="quant"):
        tl.export("runs/x", to="gguf", path="x.gguf", quant="q4_k_m")


def test_cli_refuses_before_importing_torch(export_runs, tmp_path):
    proc = cli("export", str(export_runs["dora"]), "--to", "gguf-adapter", "-o", str(tmp_path / "a.gguf"),
               cwd=tmp_path)
    assert_user_error(proc, "DoRA", "--to gguf")
    proc = cli("export", str(export_runs["lora"]), "--to", "onnx", "-o", str(tmp_path / "a"), cwd=tmp_path)
    assert_user_error(proc, "to:")
    code = ("import sys; from typer.testing import CliRunner; from tunelab.cli.app import app; "
            f"r = CliRunner().invoke(app, ['export', {str(export_runs['dora'])!r}, '--to', 'gguf-adapter', '-o', "
            f"{str(tmp_path / 'b.gguf')!r}]); print('torch' in sys.modules, type(r.exception).__name__)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert out.stdout.split() == ["False", "TunelabError"], out.stderr[-2000:]
