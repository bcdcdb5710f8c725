"""tunelab.model.measured: a deciding figure is measured once per machine and kept under a key naming the machine."""

from __future__ import annotations

import json

from tunelab.model.measured import measurement_key, remembered
from tunelab.model.precision import Hardware

ZEN4 = Hardware("cpu", "AMD EPYC 9654", "x86_64", ("AVX2", "FMA", "AVX-512", "AVX512-BF16"), "AVX512")
MACHINE = ZEN4.identity()


def test_a_figure_is_measured_once_then_read_back(tmp_path):
    path = tmp_path / "home" / "measured.json"
    values = iter([2.5, 9.9])
    first = remembered("ratio", MACHINE, lambda: next(values), path)
    again = remembered("ratio", MACHINE, lambda: next(values), path)
    assert first == (2.5, "measured now")
    assert again == (2.5, f"measured earlier, kept in {path}")
    assert json.loads(path.read_text()) == {measurement_key("ratio", MACHINE): 2.5}


def test_the_machine_identity_changes_with_the_cpu_the_kernels_and_torch(monkeypatch):
    emulated = Hardware("cpu", ZEN4.name, ZEN4.arch, ZEN4.extensions, "AVX2")
    other = Hardware("cpu", "Intel Xeon", ZEN4.arch, ZEN4.extensions, "AVX512")
    identities = {ZEN4.identity(), emulated.identity(), other.identity()}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    identities.add(ZEN4.identity())
    assert len(identities) == 4
    assert "torch " in ZEN4.identity() and ZEN4.name in ZEN4.identity()
    assert measurement_key("a", MACHINE) != measurement_key("b", MACHINE)


def test_a_damaged_file_is_measured_again_and_replaced_whole(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text("{not json")
    assert remembered("ratio", MACHINE, lambda: 1.5, path) == (1.5, "measured now")
    assert json.loads(path.read_text()) == {measurement_key("ratio", MACHINE): 1.5}
    assert not [p for p in tmp_path.iterdir() if p.name != "measured.json"]  # no temporary file left


def test_an_unwritable_home_still_gives_the_figure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert remembered("ratio", MACHINE, lambda: 3.0, blocker / "measured.json") == (3.0, "measured now")
