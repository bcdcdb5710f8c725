"""tunelab.cli.allocator: model verbs relaunch once, in place, on tcmalloc when the system has it; never otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunelab.cli import allocator
from tunelab.cli.allocator import OPT_OUT_VARIABLE, RELAUNCHED_VARIABLE, active_allocator, relaunch_env

LIBRARY = "libtcmalloc_minimal.so.4"


def test_relaunch_env_preloads_the_library_before_the_users_own():
    env = relaunch_env({"PATH": "/bin", "LD_PRELOAD": "libmine.so"}, LIBRARY, "system")
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIBRARY}:libmine.so"
    assert env["PATH"] == "/bin" and env[RELAUNCHED_VARIABLE] == "1"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert relaunch_env({}, LIBRARY, "system")["LD_PRELOAD"] == LIBRARY  # no stray ":"


def test_relaunch_env_keeps_the_users_tcmalloc_settings():
    env = relaunch_env({"TCMALLOC_RELEASE_RATE": "5"}, LIBRARY, "system")
    assert env is not None and env["TCMALLOC_RELEASE_RATE"] == "5"


@pytest.mark.parametrize("environ, library, active", [
    ({OPT_OUT_VARIABLE: "system"}, LIBRARY, "system"),   # the user opted out
    ({OPT_OUT_VARIABLE: "SYSTEM"}, LIBRARY, "system"),
    ({RELAUNCHED_VARIABLE: "1"}, LIBRARY, "system"),     # already relaunched (even if the preload failed)
    ({}, LIBRARY, "tcmalloc"),                           # already on a fast allocator
    ({}, LIBRARY, "jemalloc"),
    ({}, None, "system"),                                # nothing to load
])
def test_no_relaunch(environ, library, active):
    assert relaunch_env(environ, library, active) is None


def test_active_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert active_allocator(maps) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert active_allocator(maps) == "tcmalloc"
    assert active_allocator(tmp_path / "missing") == "system"


# Prints the allocator and the PID after the relaunch: one line means the process was replaced, not forked.
PROBE = textwrap.dedent("""
    import os
    from tunelab.cli.allocator import active_allocator, relaunch_with_tcmalloc
    relaunch_with_tcmalloc()
    print(active_allocator(), os.getpid())
""")


def _probe(extra_env: dict[str, str]) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in (RELAUNCHED_VARIABLE, OPT_OUT_VARIABLE, "LD_PRELOAD")}
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=env | extra_env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    (line,) = out.splitlines()
    name, pid = line.split()
    return name, int(pid), proc.pid


@pytest.mark.skipif(allocator.find_tcmalloc() is None or not sys.platform.startswith("linux"),
                    reason=f"no tcmalloc on this machine ({allocator.INSTALL_HINT})")
def test_relaunch_runs_the_same_process_on_tcmalloc():
    name, pid, started = _probe({})
    assert name == "tcmalloc" and pid == started
    assert _probe({OPT_OUT_VARIABLE: "system"})[0] == "system"


def test_without_tcmalloc_the_process_goes_on_as_it_is(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.delenv(RELAUNCHED_VARIABLE, raising=False)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not relaunch"))
    allocator.relaunch_with_tcmalloc()
    assert "apt install libtcmalloc-minimal4" in allocator.describe()


def test_only_model_verbs_relaunch():
    import typer

    from tunelab.cli.app import MODEL_VERBS, app

    verbs = typer.main.get_command(app).commands
    assert MODEL_VERBS <= verbs.keys()  # each name is a real verb
    assert {"data", "models"} <= verbs.keys() - MODEL_VERBS  # file and registry verbs never load a model


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD relaunch is Linux only")
def test_relaunch_keeps_the_command_line(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: LIBRARY)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.delenv(RELAUNCHED_VARIABLE, raising=False)
    monkeypatch.delenv(OPT_OUT_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "utf8", "-m", "tunelab", "train", "run.yaml"])
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    allocator.relaunch_with_tcmalloc()
    ((exe, argv, env),) = calls
    assert Path(exe) == Path(sys.executable)
    assert argv == [sys.executable, "-X", "utf8", "-m", "tunelab", "train", "run.yaml"]
    assert env["LD_PRELOAD"].startswith(LIBRARY) and env[RELAUNCHED_VARIABLE] == "1"


def test_an_unknown_choice_is_a_user_error():
    env = {k: v for k, v in os.environ.items() if k != RELAUNCHED_VARIABLE} | {OPT_OUT_VARIABLE: "glibc"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "TUNELAB_ALLOCATOR='glibc' is not one of tcmalloc, system" in proc.stderr and "fix:" in proc.stderr
