"""Which arithmetic a run uses, decided from what the hardware is, and said in plain words.

    hw = detect_hardware()        # CPU model and vector extensions (or the GPU and its compute capability)
    hw.describe()                 # 'AMD EPYC (x86_64: AVX2, FMA, AVX-512, AVX512-BF16, AVX512-VNNI; no AMX)'
    p = choose_precision("auto")  # Precision(bf16=..., device="cpu", reason="...")
    with p.autocast(): ...        # bf16 autocast, or nothing in fp32

The rule for `auto`: bf16 autocast where bf16 matrix products have units of their own, else fp32.
On CUDA that is a GPU that supports bf16 (compute capability 8.0 and newer). On a CPU it is AMX
(Intel Xeon 4th generation and newer): its tile units multiply bf16 matrices. AVX512-BF16 (AMD Zen 4,
Intel Cooper Lake) has bf16 dot-product instructions but no tiles; AVX2-only CPUs have neither and
emulate bf16 in software, far slower than fp32. tunelab keeps fp32 on those two classes, and the run
log names the class; `train.precision: bf16` overrides it. docs/benchmarks.md has the measurements
per CPU class.

Features are read from /proc/cpuinfo (Linux; x86 `flags`, ARM `Features`) and from torch's own
dispatch level (`torch.backends.cpu.get_cpu_capability()`), so a CPU that torch was told to treat as a
lesser one (ATEN_CPU_CAPABILITY=avx2) is described as torch will run it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import SERVE_BF16_MIN_SPEEDUP

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

    @property
    def amx(self) -> bool:
        return "AMX-BF16" in self.extensions and self.torch_capability not in ("AVX2", "DEFAULT")

    @property
    def avx512_bf16(self) -> bool:
        return "AVX512-BF16" in self.extensions and self.torch_capability not in ("AVX2", "DEFAULT")

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


def choose_precision(setting: str, hardware: Hardware | None = None) -> Precision:
    """`train.precision`: 'bf16' or 'fp32' as set, or 'auto' decided from the hardware (see the module docstring)."""
    hw = hardware or detect_hardware()
    if setting == "fp32":
        return Precision(False, hw.device, "fp32 (set in the config)")
    if setting == "bf16":
        return Precision(True, hw.device, "bf16 autocast (set in the config)")
    if hw.device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Precision(ok, "cuda", f"bf16 autocast: {hw.describe()} supports bf16" if ok
                         else f"fp32: {hw.describe()} has no bf16 support")
    if hw.amx:
        return Precision(True, "cpu", f"bf16 autocast: {hw.describe()} multiplies bf16 matrices on its AMX tiles")
    if hw.avx512_bf16:
        why = "it has AVX512-BF16 instructions but no AMX tiles; set train.precision: bf16 to use them"
    else:
        why = "it has no bf16 matrix units, and emulated bf16 is slower than fp32"
    return Precision(False, "cpu", f"fp32: {hw.describe()}: {why}")


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls, after one warm-up call (oneDNN builds its kernel on the first)."""
    import time

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_bf16_speedup(rows: int = 16, k: int = 576, n: int = 1536, repeats: int = 15) -> float:
    """fp32 time / bf16 time of one (rows, k) x (k, n) product, each with its weights already in its dtype.

    A decode step is such products (a few rows against a whole weight matrix): bound by reading the
    weights, so halving their bytes helps wherever bf16 products are not emulated. Takes ~20 ms; uses the
    threads torch is set to, and its own generator (no draw from the global RNG).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator)
    w = torch.randn(n, k, generator=generator)
    xb, wb = x.bfloat16(), w.bfloat16()
    fp32 = median_seconds(lambda: torch.nn.functional.linear(x, w), repeats)
    return fp32 / median_seconds(lambda: torch.nn.functional.linear(xb, wb), repeats)


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
