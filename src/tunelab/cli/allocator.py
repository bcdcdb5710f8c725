"""Run on tcmalloc instead of glibc's malloc, by relaunching the command once with it preloaded.

Why: a training step allocates and frees hundreds of activation buffers of a few MB each. glibc's
malloc gives many of them back to the kernel and takes them again, and pays for it in page faults
and freshly zeroed pages; tcmalloc keeps them for the next step. Training on it ran faster at
batch 16, and more so at batch 64 (776-1,014 -> 1,311-1,435 tokens/s on the 2-core AMX VM);
jemalloc gained less. The figures are in docs/benchmarks.md.

A process cannot change its malloc once it has started: libc's is bound when the program loads.
The only way in is LD_PRELOAD at exec, which is what PyTorch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`) does too. We do not call that
launcher: it looks only for `libtcmalloc.so` (Debian ships that name only in the -dev package),
and it starts a child process, where we replace this one in place (same PID, so torchrun and
signals see no difference). The library comes from the system: `apt install libtcmalloc-minimal4`
(no wheel on PyPI ships it). Without it, or with TUNELAB_ALLOCATOR=system, nothing changes.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT_VARIABLE = "TUNELAB_ALLOCATOR"  # "system": keep glibc's malloc; "tcmalloc" (or unset): the default
CHOICES = ("tcmalloc", "system")
RELAUNCHED_VARIABLE = "TUNELAB_ALLOCATOR_RELAUNCHED"  # set in the relaunched process: never relaunch twice
# gperftools' allocator: the minimal build (Debian/Ubuntu libtcmalloc-minimal4), else the full one.
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
INSTALL_HINT = "apt install libtcmalloc-minimal4"
# tcmalloc returns freed pages to the kernel slowly by default; 0 keeps them (a few % more tokens/s at
# batch 16 on the 2-core AMX VM, within its noise but never worse). A user's own setting wins.
TCMALLOC_DEFAULTS = {"TCMALLOC_RELEASE_RATE": "0"}


def opted_out(environ: Mapping[str, str]) -> bool:
    """Whether the user asked for glibc's malloc (TUNELAB_ALLOCATOR=system)."""
    return environ.get(OPT_OUT_VARIABLE, "").lower() == "system"


def find_tcmalloc() -> str | None:
    """The tcmalloc library's name as the dynamic loader finds it (e.g. libtcmalloc_minimal.so.4), or None."""
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """Which malloc this process runs on: "tcmalloc", "jemalloc", or "system" (glibc's, or not Linux)."""
    try:
        mapped = maps.read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in mapped:
            return name
    return "system"


def relaunch_env(environ: Mapping[str, str], library: str | None, active: str) -> dict[str, str] | None:
    """The environment to relaunch with tcmalloc preloaded, or None when the process should go on as it is:
    the user opted out, this already is the relaunched process, a fast allocator already runs, or there is
    no tcmalloc to load."""
    if opted_out(environ) or environ.get(RELAUNCHED_VARIABLE):
        return None
    if active != "system" or library is None:
        return None
    return preload_env(environ, library) | {RELAUNCHED_VARIABLE: "1"}


def preload_env(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """`environ` with `library` first in LD_PRELOAD and tcmalloc's defaults where the user set none."""
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(x for x in (library, environ.get("LD_PRELOAD", "")) if x)
    for key, value in TCMALLOC_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def relaunch_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded, when there is one to load (Linux only).
    Call it first thing, before any work: nothing done so far survives the exec."""
    choice = os.environ.get(OPT_OUT_VARIABLE, "")
    if choice.lower() not in ("", *CHOICES):
        print(f"error: {OPT_OUT_VARIABLE}={choice!r} is not one of {', '.join(CHOICES)} (fix: set it to system to "
              "keep glibc's malloc, or unset it)", file=sys.stderr)
        sys.exit(2)
    if not sys.platform.startswith("linux"):
        return
    env = relaunch_env(os.environ, find_tcmalloc(), active_allocator())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the command as typed to the interpreter (`python -m tunelab ...` or the console
    # script), options like -X included, so the relaunched process is the same command.
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    """One line for a run's log: the allocator, and how to get tcmalloc when it is not there."""
    active = active_allocator()
    if active != "system":
        return active
    if opted_out(os.environ):
        return f"system malloc ({OPT_OUT_VARIABLE}=system)"
    if find_tcmalloc() is None and sys.platform.startswith("linux"):
        return f"system malloc (tcmalloc trains faster on CPU: {INSTALL_HINT})"
    return "system malloc"
