"""One export, top to bottom: check the request, load the fine-tune, write the target, verify it, record it.

    record = run_export("banking@production", ExportConfig(to="gguf", path=Path("out/banking.gguf")))

Everything is written into a temporary folder beside the output and moved into place only after the
checks pass, so a failed export leaves nothing that looks whole. A folder target (hf, ollama) holds its
export.json; a file target (gguf, gguf-adapter) gets one beside it, `<name>.export.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import ExportConfig
from tunelab.errors import TunelabError
from tunelab.export.record import Check, ExportRecord, file_records
from tunelab.export.source import ExportSource, resolve_source

if TYPE_CHECKING:
    from tunelab.export.verify import Outputs

log = logging.getLogger(__name__)
RECORD = "export.json"
FILE_TARGETS = ("gguf", "gguf-adapter")


def record_path(cfg: ExportConfig) -> Path:
    return cfg.path.with_suffix(".export.json") if cfg.to in FILE_TARGETS else cfg.path / RECORD


def preflight(requested: str | Path, cfg: ExportConfig) -> ExportSource:
    """Every check that needs no model (torch is not imported): the source, the output path, what is refused."""
    from tunelab.export.adapter_gguf import check_adapter_gguf

    src = resolve_source(requested)
    if cfg.to in FILE_TARGETS and cfg.path.suffix != ".gguf":
        raise TunelabError(f"--to {cfg.to} writes one GGUF file; {cfg.path} does not end in .gguf",
                           fix=f"pass e.g. -o out/{src.run.path.name}.gguf")
    if cfg.path.exists() and not cfg.overwrite:
        raise TunelabError(f"{cfg.path} exists", fix="choose another -o, or pass --overwrite to replace it")
    if cfg.path.exists() and cfg.to in FILE_TARGETS and cfg.path.is_dir():
        raise TunelabError(f"{cfg.path} is a folder; --to {cfg.to} writes a file", fix="pass a .gguf file name")
    if cfg.to == "gguf-adapter":
        if src.full:
            raise TunelabError("this run fine-tuned every weight: it has no adapter to write", where=str(src.run.path),
                               fix="export the whole model: --to gguf (or --to hf)")
        check_adapter_gguf(src.adapter_config, where=str(src.run.path / "adapter"))
    return src


@dataclass
class Verifying:
    """What the checks share: the prompts and the reference outputs (None throughout with --no-verify)."""

    prompts: list
    eos: int | None
    new_tokens: int
    unmerged: Outputs  # fp32 base + adapter: the reference
    base: Outputs  # the base alone, on the reference's sequences
    merged: Outputs | None = None

    def outputs(self, model, reference: Outputs) -> Outputs:
        from tunelab.export.verify import outputs

        return outputs(model, self.prompts, self.new_tokens, self.eos, reference.sequences)


def run_export(requested: str | Path, cfg: ExportConfig) -> ExportRecord:
    started = time.perf_counter()
    src = preflight(requested, cfg)
    import torch

    from tunelab.export import verify
    from tunelab.export.source import base_record, load_base, load_tokenizer, load_unmerged, verification_prompts

    torch.manual_seed(0)
    base = base_record(src)
    tokenizer = load_tokenizer(src)
    log.info("export: %s (%s) -> %s %s", src.name, src.method(), cfg.to, cfg.path)
    unmerged = load_unmerged(src)
    record = ExportRecord(target=cfg.to, path=str(cfg.path), source=src.record(), base=base, verified=cfg.verify,
                          tunelab_version=_version())
    check: Verifying | None = None
    if cfg.verify:
        prompts, prompt_source = verification_prompts(src, tokenizer, cfg.prompts)
        log.info("export: verifying on %d prompts from %s", len(prompts), prompt_source)
        eos = tokenizer.eos_token_id
        ref = verify.outputs(unmerged, prompts, cfg.new_tokens, eos)
        if src.full:
            base_out = verify.outputs(load_base(src), prompts, cfg.new_tokens, eos, ref.sequences)
        else:
            with unmerged.disable_adapter():
                base_out = verify.outputs(unmerged, prompts, cfg.new_tokens, eos, ref.sequences)
        check = Verifying(prompts, eos, cfg.new_tokens, ref, base_out)
    else:
        record.warnings.append("not verified (--no-verify): no figure below was computed")

    cfg.path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.path.name}.", dir=cfg.path.parent))
    try:
        if cfg.to == "gguf-adapter":
            _adapter(src, cfg, unmerged, tokenizer, record, staging / cfg.path.name, check)
        else:
            from tunelab.export.merge import merge

            merged = merge(src, unmerged)
            del unmerged
            if check:
                check.merged = check.outputs(merged, check.unmerged)
                if not src.full:
                    record.checks.append(verify.compare(
                        "merge", check.unmerged, check.merged, cfg.merge_tolerance, greedy_equal=True,
                        relative=cfg.merge_relative, what="fp32 base + adapter (unmerged, PEFT) vs the merged fp32 model"))
                record.checks.append(verify.non_vacuity(check.base, check.merged, cfg.non_vacuity, "the merged model"))
                check.unmerged.logits.clear()  # (T, vocab) per prompt: freed once compared
            if cfg.to == "hf":
                _hf(cfg, merged, tokenizer, record, staging, check)
            else:
                gguf_file = staging / (cfg.path.name if cfg.to == "gguf" else f"model-{cfg.quant.upper()}.gguf")
                _gguf(src, cfg, merged, tokenizer, record, gguf_file, check)
                if cfg.to == "ollama":
                    _ollama(src, tokenizer, record, staging, gguf_file, check)
        record.files = file_records(staging, [p for p in staging.rglob("*") if p.is_file()])
        record.seconds = round(time.perf_counter() - started, 2)
        _raise_if_failed(record, src)
        _move_into_place(cfg, staging, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _raise_if_failed(record: ExportRecord, src: ExportSource) -> None:
    failed = record.failed()
    if failed:
        raise TunelabError(
            "export verification failed: " + "; ".join(
                f"{c.name}: {c.detail} ({', '.join(f'{k}={v}' for k, v in list(c.figures.items())[:6])})"
                for c in failed),
            where=str(src.run.path),
            fix="nothing was written; docs/export.md says what each check means. --no-verify writes it unchecked "
                "(export.json then says so)")


def _move_into_place(cfg: ExportConfig, staging: Path, record: ExportRecord) -> None:
    if cfg.path.exists():  # --overwrite (preflight refused it otherwise)
        shutil.rmtree(cfg.path) if cfg.path.is_dir() else cfg.path.unlink()
    if cfg.to in FILE_TARGETS:
        os.replace(staging / cfg.path.name, cfg.path)
        record.write(record_path(cfg))
    else:
        record.write(staging / RECORD)
        staging.rename(cfg.path)


def _hf(cfg: ExportConfig, merged, tokenizer, record: ExportRecord, folder: Path, check: Verifying | None) -> None:
    import torch

    from tunelab.export import verify
    from tunelab.export.merge import base_dtype, save_hf
    from tunelab.model.template_canary import template_fingerprint

    dtype = base_dtype(Path(record.base.path)) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    save_hf(merged, tokenizer, folder, dtype)
    record.dtype = str(dtype).removeprefix("torch.")
    if check is None:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    exact = record.dtype == "float32"
    limit = cfg.merge_tolerance if exact else cfg.gguf_tolerance["f16" if record.dtype == "float16" else "bf16"]
    record.checks.append(verify.compare(
        "hf-reload", check.merged, check.outputs(reloaded, check.merged), limit, greedy_equal=exact,
        relative=cfg.merge_relative if exact else None,
        what=f"the folder reloaded by AutoModelForCausalLM ({record.dtype} on disk) vs the merged fp32 model"))
    saved = AutoTokenizer.from_pretrained(folder)
    stray = [n for n in ("adapter_config.json", "adapter_model.safetensors") if (folder / n).exists()]
    same_template = template_fingerprint(saved) == template_fingerprint(tokenizer)
    record.checks.append(Check(name="hf-files", passed=not stray and same_template,
                               figures={"adapter_files": ", ".join(stray) or "none",
                                        "chat_template_as_trained": same_template, "eos_token": saved.eos_token},
                               detail="no adapter_config.json (peft #1381); the saved tokenizer renders the template "
                                      "canary exactly as the run's"))


def _gguf(src: ExportSource, cfg: ExportConfig, merged, tokenizer, record: ExportRecord, path: Path,
          check: Verifying | None) -> None:
    import gguf

    from tunelab.export import verify
    from tunelab.export.gguf_meta import KV, metadata_from_gguf, metadata_from_hf, model_kvs, require_llama
    from tunelab.export.gguf_writer import FILE_TYPES, FOUR_BIT, write_model_gguf

    require_llama(merged.config, where=str(src.run.path))
    base_gguf = Path(record.base.gguf) if record.base.gguf else None
    kvs = (metadata_from_gguf(base_gguf, merged.config) if base_gguf
           else metadata_from_hf(src.run.path / "tokenizer", tokenizer, merged.config))
    # The end-of-turn token the adapter learned to stop on is the run's eos, whatever the base file said.
    kvs = [kv for kv in kvs if kv.key != gguf.Keys.Tokenizer.EOS_ID]
    kvs.append(KV(gguf.Keys.Tokenizer.EOS_ID, tokenizer.eos_token_id, gguf.GGUFValueType.UINT32))
    kvs += model_kvs(src.name, int(FILE_TYPES[cfg.quant]), tokenizer.chat_template)
    record.quant = cfg.quant
    record.tensor_types = write_model_gguf(path, merged, kvs, cfg.quant)
    if check is None:
        return
    pre = next(kv.value for kv in kvs if kv.key == gguf.Keys.Tokenizer.PRE)
    record.checks.append(verify.gguf_metadata(path, {
        gguf.Keys.General.ARCHITECTURE: "llama", gguf.Keys.General.TYPE: "model",
        gguf.Keys.General.FILE_TYPE: int(FILE_TYPES[cfg.quant]), gguf.Keys.Tokenizer.PRE: _source_pre(record, src, pre),
        gguf.Keys.Tokenizer.EOS_ID: tokenizer.eos_token_id, gguf.Keys.Tokenizer.CHAT_TEMPLATE: tokenizer.chat_template,
        "llama.block_count": merged.config.num_hidden_layers}))
    read_back = check.outputs(verify.load_gguf_model(path), check.merged)
    what = f"the {cfg.quant.upper()} GGUF read back by transformers' GGUF loader vs the merged fp32 model"
    if cfg.quant in cfg.gguf_tolerance:
        exact = cfg.quant == "f32"
        record.checks.append(verify.compare("gguf-logits", check.merged, read_back, cfg.gguf_tolerance[cfg.quant],
                                            greedy_equal=exact, relative=cfg.merge_relative if exact else None,
                                            what=what))
    elif cfg.quant in FOUR_BIT:
        result = verify.compare("gguf-logits", check.merged, read_back, what=what + " (4-bit: measured, not gated)")
        kept = result.figures["greedy_agreement"]
        like_base = verify.figures(check.base, read_back)["greedy_agreement"]
        result.figures["greedy_agreement_with_base"] = like_base
        record.checks.append(result)
        record.warnings.append(
            f"{cfg.quant} re-quantizes the merged weights to 4 bits: its greedy continuations equal the fp32 merge's "
            f"on {kept:.0%} of prompts (the base's on {like_base:.0%}), top-1 agreement "
            f"{result.figures['top1_agreement']:.1%}. 4-bit rounding can erase a fine-tune's small delta; prefer "
            "q8_0 or f16, or --to gguf-adapter over the base GGUF")
        log.warning("export: %s", record.warnings[-1])
    else:
        record.checks.append(verify.compare("gguf-logits", check.merged, read_back,
                                            min_top1=cfg.min_top1_agreement, what=what))
    _tokenization(record, tokenizer, path, check)


def _source_pre(record: ExportRecord, src: ExportSource, written: str) -> str:
    """The pre-tokenizer the source states: the base GGUF's key, or the one read from the run's tokenizer.json."""
    import json

    import gguf

    from tunelab.export.gguf_meta import pre_tokenizer_name, read_field

    if record.base.gguf:
        return read_field(gguf.GGUFReader(record.base.gguf), gguf.Keys.Tokenizer.PRE)
    tok = json.loads((src.run.path / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    return pre_tokenizer_name(tok) or written


def _tokenization(record: ExportRecord, tokenizer, gguf_path: Path, check: Verifying) -> None:
    """The training tokenizer vs llama.cpp's reading of the GGUF; a difference is recorded and warned about."""
    import gguf

    from tunelab.export.gguf_meta import read_field
    from tunelab.export.tokenization import PROBE_TEXTS, compare_tokenization, implied_tokenizer

    reader = gguf.GGUFReader(gguf_path)
    pre = read_field(reader, gguf.Keys.Tokenizer.PRE)
    try:
        implied = implied_tokenizer(reader)
    except ValueError as exc:
        record.warnings.append(f"tokenization not compared: {exc}")
        return
    texts = [*PROBE_TEXTS, *(tokenizer.decode(p) for p in check.prompts)]
    record.tokenization = compare_tokenization(tokenizer, implied, pre, texts)
    if not record.tokenization.agrees:
        record.warnings.append(f"llama.cpp (pre-tokenizer {pre!r}) tokenizes differently from training: "
                               f"{record.tokenization.first_difference}")
        log.warning("export: %s", record.warnings[-1])


def _adapter(src: ExportSource, cfg: ExportConfig, model, tokenizer, record: ExportRecord, path: Path,
             check: Verifying | None) -> None:
    import gguf
    import numpy as np

    from tunelab.export import verify
    from tunelab.export.adapter_gguf import gguf_alpha, write_adapter_gguf
    from tunelab.export.gguf_meta import require_llama

    require_llama(model.get_base_model().config, where=str(src.run.path))
    alpha = gguf_alpha(src.adapter_config)
    record.quant = cfg.adapter_type
    record.tensor_types = write_adapter_gguf(path, model, alpha, cfg.adapter_type, src.name)
    if record.base.gguf is None:
        record.warnings.append("the base came as an HF folder: llama.cpp needs it as a GGUF too (export a merged "
                               "GGUF, or convert the base with llama.cpp's convert_hf_to_gguf.py)")
    if check is None:
        return
    record.checks.append(verify.adapter_delta(path, model, alpha, cfg.adapter_tolerance[cfg.adapter_type]))
    record.checks.append(verify.gguf_metadata(path, {
        gguf.Keys.General.ARCHITECTURE: "llama", gguf.Keys.General.TYPE: "adapter", gguf.Keys.Adapter.TYPE: "lora",
        gguf.Keys.Adapter.LORA_ALPHA: float(np.float32(alpha))}))
    record.checks.append(verify.non_vacuity(check.base, check.unmerged, cfg.non_vacuity, "base + adapter"))
    if record.base.gguf:
        _tokenization(record, tokenizer, Path(record.base.gguf), check)


def _ollama(src: ExportSource, tokenizer, record: ExportRecord, folder: Path, gguf_file: Path,
            check: Verifying | None) -> None:
    from tunelab.export.ollama import modelfile, modelfile_check, turn_format
    from tunelab.io import write_text_atomic

    fmt = turn_format(tokenizer, where=str(src.run.path / "tokenizer"))
    text = modelfile(fmt, gguf_file.name, origin=src.name)
    write_text_atomic(folder / "Modelfile", text)
    if check is not None:
        record.checks.append(modelfile_check(text, tokenizer))


def _version() -> str:
    import importlib.metadata

    try:  # not `tunelab.__version__`: the package root sits above this layer (tests/test_imports.py)
        return importlib.metadata.version("tunelab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
