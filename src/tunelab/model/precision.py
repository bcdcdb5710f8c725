"""Which arithmetic a run uses, decided from what the hardware is and how fast it computes, said in plain words.

    hw = detect_hardware()        # CPU model and vector extensions (or the GPU and its compute capability)
    hw.describe()                 # 'AMD EPYC (x86_64: AVX2, FMA, AVX-512, AVX512-BF16, AVX512-VNNI; no AMX)'
    p = choose_precision("auto")  # Precision(bf16=..., device="cpu", reason="...")
    with p.autocast(): ...        # bf16 autocast, or nothing in fp32

The rule for `auto` on a CPU is a measurement, not a list of CPU names: a training-sized matrix product
is timed in fp32 and in bf16, and bf16 autocast is chosen where it is at least `TRAIN_BF16_MIN_SPEEDUP`
times faster. AMX tiles (Intel Xeon 4th generation and newer) and AVX512-BF16 instructions (AMD Zen 4,
Intel Cooper Lake) make bf16 faster; AVX2-only CPUs emulate bf16 in software, slower than fp32. The
figure is kept per CPU and torch version (tunelab/model/measured.py), so one machine decides the same way
every run, and the run log states it. On CUDA the rule is bf16 support (compute capability 8.0 and
newer). `train.precision: bf16 | fp32` decides by hand. docs/benchmarks.md has the figures per CPU class.

Features are read from /proc/cpuinfo (Linux; x86 `flags`, ARM `Features`) and from torch's own
dispatch level (`torch.backends.cpu.get_cpu_capability()`), so a CPU that torch was told to treat as a
lesser one (ATEN_CPU_CAPABILITY=avx2) is described as torch will run it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import SERVE_BF16_MIN_SPEEDUP, TRAIN_BF16_MIN_SPEEDUP
from tunelab.model.measured import remembered

# /proc/cpuinfo flag -> the name people know, in the order a description lists them.
X86_EXTENSIONS = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
}
ARM_EXTENSIONS = {"asimd": "NEON", "bf16": "BF16", "i8mm": "I8MM", "sve": "SVE", "sve2": "SVE2"}


@dataclass(frozen=True)
class Hardware:
    """What the arithmetic runs on. `extensions` are the names people know (AVX2, AMX-BF16, NEON, ...)."""

    device: str  # "cpu" | "cuda"
    name: str  # CPU model (or GPU name)
    arch: str  # x86_64, aarch64, ... (CUDA: "sm_90")
    extensions: tuple[str, ...]
    torch_capability: str  # torch's CPU dispatch level: "AMX", "AVX512", "AVX2", "DEFAULT", ...

    def identity(self) -> str:
        """Everything that changes how fast this machine computes a dtype: the CPU model and extensions, torch's
        version and dispatch level, and the oneDNN ISA limit (model/measured.py keeps figures under it)."""
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        return (f"{self.name} | {self.arch}: {','.join(self.extensions)} | torch {torch.__version__} dispatch "
                f"{self.torch_capability or '-'} | oneDNN ISA {isa or 'any'}")

    def describe(self) -> str:
        """One line for a log or a benchmark table."""
        if self.device == "cuda":
            return f"{self.name} (CUDA {self.arch})"
        listed = ", ".join(self.extensions) or "no vector extensions listed"
        missing = "; no AMX" if self.arch == "x86_64" and not any(e.startswith("AMX") for e in self.extensions) else ""
        # Below what the CPU has (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine, to emulate another class)
        limited = (f"; torch dispatches {self.torch_capability} kernels"
                   if ("AVX-512" in self.extensions and self.torch_capability in ("AVX2", "DEFAULT"))
                   or ("AVX2" in self.extensions and self.torch_capability == "DEFAULT") else "")
        return f"{self.name} ({self.arch}: {listed}{missing}{limited})"


@functools.cache
def detect_hardware() -> Hardware:
    """The device training would run on (the first CUDA GPU if there is one, else this CPU)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return Hardware("cuda", torch.cuda.get_device_name(), f"sm_{major}{minor}", (), "")
    info = _cpuinfo()
    arch = platform.machine() or "unknown"
    flags = set((info.get("flags") or info.get("Features") or "").split())
    known = X86_EXTENSIONS if arch in ("x86_64", "AMD64") else ARM_EXTENSIONS
    name = info.get("model name") or info.get("Model") or platform.processor() or arch
    return Hardware("cpu", name.strip(), arch, tuple(v for k, v in known.items() if k in flags), _torch_capability())


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _torch_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return ""


@dataclass(frozen=True)
class Precision:
    bf16: bool
    device: str
    reason: str  # said in the run log

    @property
    def weights_dtype(self) -> torch.dtype:
        """Frozen base weights: bf16 when computing in bf16 (trainable params stay fp32)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)


def choose_precision(setting: str, hardware: Hardware | None = None,
                     speedup: Callable[[], tuple[float, str]] | None = None) -> Precision:
    """`train.precision`: 'bf16' or 'fp32' as set, or for 'auto' on a CPU bf16 autocast where a training-sized
    product measured `TRAIN_BF16_MIN_SPEEDUP` times faster in bf16 (see the module docstring).
    `speedup` gives (ratio, where it came from); by default this machine's kept measurement."""
    hw = hardware or detect_hardware()
    if setting == "fp32":
        return Precision(False, hw.device, "fp32 (set in the config)")
    if setting == "bf16":
        return Precision(True, hw.device, "bf16 autocast (set in the config)")
    if hw.device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Precision(ok, "cuda", f"bf16 autocast: {hw.describe()} supports bf16" if ok
                         else f"fp32: {hw.describe()} has no bf16 support")
    ratio, source = (speedup or (lambda: remembered("train_bf16_speedup", hw.identity(), measure_training_bf16_speedup)))()
    if ratio >= TRAIN_BF16_MIN_SPEEDUP:
        return Precision(True, "cpu", f"bf16 autocast: on {hw.describe()} a training-sized matrix product ran "
                                      f"{ratio:.1f}x faster in bf16 than in fp32 ({source})")
    why = ("bf16 is emulated in software here" if ratio < 1 else
           f"too little to pay for bf16's rounding (auto needs {TRAIN_BF16_MIN_SPEEDUP}x)")
    return Precision(False, "cpu", f"fp32: on {hw.describe()} a training-sized matrix product ran {ratio:.2f}x as "
                                   f"fast in bf16 as in fp32 ({source}): {why}; train.precision: bf16 forces it")


def speedup(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int) -> float:
    """baseline time / candidate time, measuring the arithmetic rather than the scheduler: the two are timed in
    alternation (both meet the same busy moments) and each keeps its fastest of `repeats` calls (another
    process taking a core adds time and never removes any); two untimed rounds first (oneDNN builds its
    kernels on the first calls). Why not a median of one's calls, then the other's: docs/benchmarks.md, CPU
    classes."""
    import time

    calls = (baseline, candidate)
    best = [float("inf"), float("inf")]
    for round_ in range(repeats + 2):
        for i, call in enumerate(calls):
            started = time.perf_counter()
            call()
            if round_ >= 2:
                best[i] = min(best[i], time.perf_counter() - started)
    return best[0] / best[1]


def measure_bf16_speedup(rows: int = 16, k: int = 576, n: int = 1536, repeats: int = 15) -> float:
    """fp32 time / bf16 time of one (rows, k) x (k, n) product, each with its weights already in its dtype.

    A decode step is such products (a few rows against a whole weight matrix): bound by reading the
    weights, so halving their bytes helps wherever bf16 products are not emulated. Timed by `speedup` on
    one thread: a product split over threads waits for the slowest, and with another process on a core that
    is a whole time slice on some calls and not others. Its own generator (no draw from the global RNG).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator)
    w = torch.randn(n, k, generator=generator)
    xb, wb = x.bfloat16(), w.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return speedup(lambda: torch.nn.functional.linear(x, w), lambda: torch.nn.functional.linear(xb, wb),
                       repeats)
    finally:
        torch.set_num_threads(threads)


def measure_training_bf16_speedup(repeats: int = 10) -> float:
    """fp32 time / bf16 time of a training step's product: 1,024 token rows through a 576 x 1,536 layer (a
    batch of 32 rows of ~32 tokens through SmolLM2's MLP). Compute-bound, unlike the decode probe above.

    A small product is timed first: where bf16 is emulated it runs at a few GFLOP/s, and the large one would
    take seconds to say the same. Otherwise both take a fraction of a second (docs/benchmarks.md).
    """
    small = measure_bf16_speedup(rows=32, k=576, n=576, repeats=repeats)
    if small < 0.5:
        return small
    return measure_bf16_speedup(rows=1024, k=576, n=1536, repeats=repeats)


def choose_serving_precision(setting: str, hardware: Hardware | None = None,
                             speedup: Callable[[], float] = measure_bf16_speedup) -> Precision:
    """`serve.precision`: as set, or for 'auto' on a CPU, bf16 weights where a measured decode-sized product is
    `SERVE_BF16_MIN_SPEEDUP` times faster in bf16 (so AVX512-BF16 parts, which training leaves in fp32, serve in
    bf16 when it pays), else fp32."""
    hw = hardware or detect_hardware()
    if setting != "auto" or hw.device == "cuda":
        return choose_precision(setting, hw)
    ratio = speedup()
    if ratio >= SERVE_BF16_MIN_SPEEDUP:
        return Precision(True, "cpu", f"bf16 weights: on {hw.describe()} a decode-sized matrix product ran "
                                      f"{ratio:.1f}x faster in bf16 than in fp32 (measured at start)")
    return Precision(False, "cpu", f"fp32: on {hw.describe()} a decode-sized matrix product ran {ratio:.2f}x "
                                   "as fast in bf16 as in fp32 (measured at start): too little to pay for "
                                   "bf16's rounding (set precision: bf16 to use it)")
