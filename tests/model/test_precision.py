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


@pytest.mark.parametrize(("hw", "bf16", "says"), [
    (AMX, True, "AMX tiles"),
    (ZEN4, False, "AVX512-BF16 instructions but no AMX tiles; set train.precision: bf16"),
    (ZEN2, False, "no bf16 matrix units"),
    (GRAVITON, False, "no bf16 matrix units"),
])
def test_auto_chooses_from_the_features_and_says_which(hw, bf16, says):
    p = choose_precision("auto", hw)
    assert p.bf16 is bf16 and p.device == "cpu"
    assert says in p.reason and hw.name in p.reason
    assert p.weights_dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_a_cpu_restricted_to_avx2_kernels_is_treated_as_avx2():
    """ATEN_CPU_CAPABILITY=avx2 on an AMX machine (emulating an AVX2 one): no bf16 there, and the log says so."""
    emulated = Hardware("cpu", AMX.name, "x86_64", AMX.extensions, "AVX2")
    assert not choose_precision("auto", emulated).bf16
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
