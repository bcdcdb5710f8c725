"""Optional: a real llama.cpp (libllama through the `llama-cpp-py-sync` wheel, no build) reads the merged GGUF and
tokenizes like training did. Skipped when the wheel is missing or its library does not load: on the
development VM it installs, but its libllama needs glibc 2.38 and Debian bookworm has 2.36, so this never ran
there. A greedy comparison through libllama (and the adapter GGUF through llama_adapter_lora_init) is the next
step where it loads."""

from __future__ import annotations

import pytest


def _unavailable() -> str | None:
    try:
        from llama_cpp_py_sync._cffi_bindings import get_lib

        get_lib()  # loads libllama: raises when the system's glibc is too old for the wheel
    except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError (dlopen), OSError
        return f"llama.cpp unavailable: {str(exc).splitlines()[0][:200]}"
    return None


UNAVAILABLE = _unavailable()  # decided at collection, before the session's runs are trained for nothing
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


def test_llama_cpp_tokenizes_the_merged_gguf_like_training(export_runs, tmp_path):
    from llama_cpp_py_sync import Llama

    import tunelab as tl
    from tunelab.export.tokenization import PROBE_TEXTS
    from tunelab.rundir import load_run

    path = tmp_path / "m.gguf"
    tl.export(export_runs["lora"], to="gguf", path=path, quant="f32", prompts=2, new_tokens=4)
    _, tokenizer, _ = load_run(export_runs["lora"])
    model = Llama(str(path), n_ctx=128, verbose=False)
    try:
        for text in PROBE_TEXTS:
            assert model.tokenize(text, add_special=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        model.close()
