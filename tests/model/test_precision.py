"""tunelab.model.precision: the hardware is described as it is, and the precision follows from it."""

from __future__ import annotations

import pytest
import torch

from tunelab.model.precision import (
    Hardware,
    choose_precision,
    choose_serving_precision,
    detect_hardware,
    measure_bf16_speedup,
    measure_training_bf16_speedup,
)

AMX = Hardware("cpu", "Intel(R) Xeon(R) Platinum 8480+", "x86_64",
               ("AVX2", "FMA", "AVX-512", "AVX512-BF16", "AVX512-VNNI", "AMX-BF16", "AMX-INT8"), "AVX512")
ZEN4 = Hardware("cpu", "AMD EPYC 9654", "x86_64", ("AVX2", "FMA", "AVX-512", "AVX512-BF16", "AVX512-VNNI"), "AVX512")
ZEN2 = Hardware("cpu", "AMD EPYC 7B12", "x86_64", ("AVX2", "FMA"), "AVX2")
GRAVITON = Hardware("cpu", "Neoverse-V1", "aarch64", ("NEON", "BF16", "I8MM", "SVE"), "SVE256")


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the CPU")
def test_this_cpu_is_described_with_its_extensions():
    hw = detect_hardware()
    assert hw.device == "cpu" and hw.name and hw.arch
    flags = open("/proc/cpuinfo").read()  # noqa: SIM115 - Linux CI
    for flag, name in (("avx2", "AVX2"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")):
        assert (f" {flag}" in flags) == (name in hw.extensions), name
    assert hw.describe().startswith(hw.name)


@pytest.mark.parametrize(("hw", "ratio", "bf16", "says"), [
    (AMX, 9.0, True, "9.0x faster in bf16"),
    (ZEN4, 2.2, True, "2.2x faster in bf16"),
    (ZEN4, 1.1, False, "too little to pay for bf16's rounding"),
    (ZEN2, 0.21, False, "bf16 is emulated in software here"),
    (GRAVITON, 0.8, False, "bf16 is emulated in software here"),
])
def test_auto_follows_the_measured_ratio_and_says_it(hw, ratio, bf16, says):
    p = choose_precision("auto", hw, lambda: (ratio, "measured now"))
    assert p.bf16 is bf16 and p.device == "cpu"
    assert says in p.reason and hw.name in p.reason and "measured now" in p.reason
    assert p.weights_dtype == (torch.bfloat16 if bf16 else torch.float32)
    if not bf16:
        assert "train.precision: bf16 forces it" in p.reason


def test_auto_measures_once_per_machine_and_keeps_the_figure(monkeypatch, tmp_path):
    """The first choice on a machine times real products; later runs reuse the figure (a resumed run cannot flip
    precision because its probe met a busy moment)."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    calls = []

    def measure(repeats=5):
        calls.append(1)
        return 1.7

    monkeypatch.setattr("tunelab.model.precision.measure_training_bf16_speedup", measure)
    first, again = choose_precision("auto", ZEN4), choose_precision("auto", ZEN4)
    assert first.bf16 and again.bf16 and len(calls) == 1
    assert "measured now" in first.reason and "measured earlier, kept in" in again.reason
    choose_precision("auto", ZEN2)  # another CPU: measured for itself
    assert len(calls) == 2


def test_the_training_measurement_is_a_ratio_of_real_products_and_stops_early_where_bf16_is_emulated(monkeypatch):
    sizes = []
    real = measure_bf16_speedup

    def spy(rows, k, n, repeats):
        sizes.append(rows)
        return 0.2 if rows == 32 else real(rows=rows, k=k, n=n, repeats=repeats)

    monkeypatch.setattr("tunelab.model.precision.measure_bf16_speedup", spy)
    assert measure_training_bf16_speedup(repeats=1) == 0.2 and sizes == [32]  # emulated: the large one is skipped
    monkeypatch.setattr("tunelab.model.precision.measure_bf16_speedup",
                        lambda rows, k, n, repeats: sizes.append(rows) or (2.0 if rows == 32 else real(rows, k, n, 1)))
    assert 0.01 < measure_training_bf16_speedup(repeats=1) < 100 and sizes[-1] == 1024


def test_a_cpu_restricted_to_avx2_kernels_is_described_so():
    """ATEN_CPU_CAPABILITY=avx2 on an AMX machine (emulating an AVX2 one): the log says torch runs AVX2 code."""
    emulated = Hardware("cpu", AMX.name, "x86_64", AMX.extensions, "AVX2")
    assert "torch dispatches AVX2 kernels" in emulated.describe()


def test_a_setting_in_the_config_wins():
    assert choose_precision("bf16", ZEN2).bf16 and "set in the config" in choose_precision("bf16", ZEN2).reason
    assert not choose_precision("fp32", AMX).bf16


def test_descriptions_name_what_is_missing():
    assert ZEN2.describe() == "AMD EPYC 7B12 (x86_64: AVX2, FMA; no AMX)"
    assert "no AMX" not in AMX.describe() and "no AMX" not in GRAVITON.describe()


def test_serving_takes_bf16_where_a_measured_decode_product_is_faster_in_it():
    def never(): raise AssertionError("a precision set in the config needs no measurement")

    fast, slow = choose_serving_precision("auto", ZEN4, lambda: 2.0), choose_serving_precision("auto", ZEN2, lambda: 0.3)
    assert fast.bf16 and "2.0x faster in bf16" in fast.reason and ZEN4.name in fast.reason
    assert not slow.bf16 and "0.30x as fast in bf16" in slow.reason
    assert not choose_serving_precision("fp32", AMX, never).bf16 and choose_serving_precision("bf16", ZEN2, never).bf16


def test_the_bf16_measurement_is_a_ratio_of_real_products():
    ratio = measure_bf16_speedup(rows=2, k=64, n=64, repeats=3)
    assert 0.01 < ratio < 100
    state = torch.random.get_rng_state()
    measure_bf16_speedup(rows=2, k=64, n=64, repeats=1)
    assert torch.equal(state, torch.random.get_rng_state())  # its own generator: a resumed run stays bitwise
