"""tunelab.io: writes are whole or absent, hashes, and where tunelab keeps things."""

from __future__ import annotations

import hashlib

import pytest

from tunelab.io import file_sha256, registry_root, staged_dir, tunelab_home, write_json_atomic, write_text_atomic


def test_atomic_writes_replace_whole_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "eval.json"
    write_json_atomic(path, {"a": 1, "path": tmp_path})  # a Path is written as text
    assert path.read_text() == f'{{\n  "a": 1,\n  "path": "{tmp_path}"\n}}\n'
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {1j: 2})  # a key JSON cannot hold: raises before anything is replaced
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_staged_dir_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "adapter"
    with staged_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "weights.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"2")
        raise RuntimeError("crash mid-save")
    assert (final / "weights.bin").read_bytes() == b"1"  # the old folder stays
    with staged_dir(final) as tmp:  # a new save replaces it whole
        (tmp / "other.bin").write_bytes(b"3")
    assert sorted(p.name for p in final.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_file_sha256_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # more than one 1 MiB block
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_home_and_registry_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNELAB_REGISTRY", raising=False)
    assert tunelab_home() == tmp_path / "home"
    assert registry_root() == tmp_path / "home" / "registry"
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "elsewhere"))
    assert registry_root() == tmp_path / "elsewhere"
