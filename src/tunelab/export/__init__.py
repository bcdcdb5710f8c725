"""Take a fine-tune to where people run models, and prove it answers the same.

    import tunelab as tl
    record = tl.export("banking@production", to="hf", path="out/banking-merged")     # merged HF folder
    record = tl.export("runs/x", to="gguf", path="out/banking.gguf", quant="q8_0")    # merged GGUF (llama.cpp)
    record = tl.export("runs/x", to="gguf-adapter", path="out/banking-lora.gguf")     # LoRA over the base GGUF
    record = tl.export("runs/x", to="ollama", path="out/banking-ollama")              # GGUF + Modelfile
    record.checks        # the verification: merge, non-vacuity, gguf-logits, gguf-metadata, modelfile, ...

The modules, one job each:

    source.py        the run or registry version, its adapter config, the fp32 reference model, the prompts
    merge.py         PEFT's fp32 safe merge (a quantized base dequantized first); the HF folder
    gguf_names.py    llama.cpp's tensor names and the q/k permutation
    gguf_meta.py     GGUF metadata: copied from the base's GGUF, or built from an HF folder (Llama family)
    gguf_writer.py   the merged GGUF (F32, F16, BF16, Q8_0; Q4_0/Q4_1 measured and warned about)
    adapter_gguf.py  the LoRA as a llama.cpp GGUF adapter, and what has no such form
    ollama.py        the Modelfile, from the adapter's own chat template
    gotemplate.py    Ollama's rendering of a TEMPLATE (Go text/template), to check the Modelfile
    tokenization.py  training's tokenizer vs llama.cpp's reading of the GGUF
    verify.py        the figures: logits, greedy continuations, metadata, adapter deltas
    record.py        export.json (ExportRecord)
    run.py           one export, top to bottom
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import ExportConfig
from tunelab.export.record import Check, ExportRecord

__all__ = ["Check", "ExportConfig", "ExportRecord", "export"]


def export(run: Any, to: str, path: Path | str, **options: Any) -> ExportRecord:
    """Export a run directory (or `tl.RunDir`), or a registry reference (NAME, NAME@3, NAME@ALIAS); returns the
    record also written as export.json. `options`: ExportConfig fields (quant, dtype, verify, overwrite, ...).

    A failed verification raises TunelabError and writes nothing; `verify=False` skips the checks and says so
    in the record.
    """
    from tunelab.errors import TunelabError, first_problem
    from tunelab.export.run import run_export

    try:
        cfg = ExportConfig.model_validate({"to": to, "path": Path(path), **options})
    except ValueError as exc:
        raise TunelabError(f"export options: {first_problem(exc)}",
                           fix="see ExportConfig in tunelab/config.py (to: hf, gguf, gguf-adapter, ollama)") from None
    source = getattr(run, "path", run)
    return run_export(source if isinstance(source, str) else Path(source), cfg)
