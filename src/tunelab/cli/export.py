"""`tunelab export RUN|NAME@ALIAS --to hf|gguf|gguf-adapter|ollama -o OUT`: a fine-tune for vLLM, llama.cpp, Ollama.

The options are checked, the run is found and what cannot be exported is refused before torch is imported;
then tunelab/export/ merges, writes, verifies, and this prints the verification table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import TunelabError


def export_cmd(
    run: Annotated[str, typer.Argument(help="A run directory, or a registry reference: NAME, NAME@3, NAME@production.")],
    to: Annotated[str, typer.Option("--to", help="hf (merged HF folder), gguf (merged GGUF), gguf-adapter (LoRA GGUF "
                                    "over the base GGUF), ollama (merged GGUF + Modelfile).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (hf, ollama) or .gguf file.")],
    quant: Annotated[str | None, typer.Option(help="gguf/ollama matrix type: q8_0 (default), f16, bf16, f32, q4_0, "
                                              "q4_1 (4-bit: measured and warned about).")] = None,
    dtype: Annotated[str | None, typer.Option(help="hf weights: float32, float16, bfloat16 (default: the base's).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the verification (export.json says so).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print export.json's content instead of the table.")] = False,
) -> None:
    """Merge and export a fine-tune (HF folder, GGUF, GGUF LoRA, Ollama), verified against the unmerged model."""
    from pydantic import ValidationError

    from tunelab.config import ExportConfig
    from tunelab.errors import first_problem

    given = {"to": to, "path": output, "quant": quant, "dtype": dtype, "verify": not no_verify, "overwrite": overwrite}
    try:
        cfg = ExportConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise TunelabError(f"export options: {first_problem(exc)}",
                           fix="see `tunelab export --help` (--to hf|gguf|gguf-adapter|ollama)") from None
    from tunelab.export.run import preflight

    preflight(run, cfg)  # a wrong path, an existing output, an adapter with no GGUF form: before torch loads
    from tunelab.cli.render import print_export
    from tunelab.export.run import run_export

    record = run_export(run, cfg)
    if as_json:
        print(record.model_dump_json(indent=2))
    else:
        print_export(record)
