"""The adapters' update of a decode step in one native call per layer (native_lora.cpp), built on first use.

    native = load()          # the compiled module, or None (with the reason logged) where it cannot be built
    native.lora_add_(y, x, lora_a, lora_b, slots)    # y (N, out) += each row's (x A_s^T) B_s, in place

Why by hand: a decode step's LoRA update is a few thousand multiply-adds per layer, and with torch
operators it costs seven operators' dispatch and allocations (~80 us a layer measured inside the engine,
against ~25 for their arithmetic and reads), in every one of 210 layers per step; no library offers a
fused multi-adapter update on CPU (vLLM's CPU path gathers each row's weights with torch operators).
docs/benchmarks.md ("Serving, session 21") has the numbers.

It is compiled once per machine with the system's C++ compiler (torch.utils.cpp_extension, cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) for this CPU's own vector instructions
(-march=native; without AVX-512 where torch is held to AVX2, as `ATEN_CPU_CAPABILITY=avx2` does to
emulate an AVX2-only CPU); the module's name carries a hash of the CPU's identity and the flags, so a
cache shared between different machines never hands one a binary built for another. Where no compiler
is found or the build fails, the server says so and computes the update with torch operators
(serve/multi_lora.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("tunelab.serve")
SOURCE = Path(__file__).with_name("native_lora.cpp")


@functools.cache
def load() -> ModuleType | None:
    """The compiled module (built on the first call on this machine, then read from the cache), or None."""
    from tunelab.model.precision import detect_hardware

    if shutil.which("c++") is None and shutil.which("g++") is None:
        log.info("LoRA update: torch operators (no C++ compiler found to build the native one)")
        return None
    try:
        from torch.utils.cpp_extension import load as build
    except ImportError as exc:  # a torch without its extension tools
        log.info("LoRA update: torch operators (%s)", exc)
        return None
    flags = ["-O3", "-march=native", "-fopenmp-simd"]
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mno-avx512f")  # torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2): so is this kernel
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + detect_hardware().identity().encode()).hexdigest()[:12]
    log.info("LoRA update: loading the native kernel (built once per machine, which takes about half a minute)")
    try:
        module = build(name=f"tunelab_lora_{key}", sources=[str(SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler error, a missing header: the torch path still serves
        log.warning("LoRA update: torch operators (the native one did not build: %s)", str(exc).splitlines()[0])
        return None
    return module
