"""A private PostgreSQL cluster for the test session: `start_postgres()` ... `server.stop()`.

    server = start_postgres()                  # initdb into /tmp/tunelab-pg-*, listen on 127.0.0.1:<free port>
    url = server.create_database("t_abc")      # postgresql://postgres@127.0.0.1:PORT/t_abc
    server.drop_database("t_abc")
    server.stop()                              # pg_ctl stop -m fast, then the directory is removed

The cluster trusts every local connection (`-A trust`), listens on 127.0.0.1 only, and keeps its unix socket
in its own directory, so it never meets a system PostgreSQL. Durability is off (fsync, synchronous_commit):
a test database lives for one test. Run as root, initdb and pg_ctl (which refuse root) run as the `postgres`
OS user through runuser. No binaries, or root without a `postgres` user: `PostgresUnavailable`; the caller
decides whether that skips or fails (tests/service/conftest.py: TUNELAB_REQUIRE_POSTGRES=1 fails).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

START_TIMEOUT_S = 60  # initdb, and pg_ctl start -w, each
STOP_TIMEOUT_S = 30
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no way to run them): the PostgreSQL tests cannot run."""


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: `pg_config --bindir`, then Debian's /usr/lib/postgresql/*/bin
    (the newest version), then PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name  # /usr/lib/postgresql/15/bin/initdb -> 15
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        candidates.append(Path(initdb).parent)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A running private cluster; `stop()` ends it and removes its directory (also at exit, if forgotten)."""

    def __init__(self, bindir: Path, base: Path, port: int, as_user: str | None) -> None:
        self.bindir = bindir
        self.base = base  # the temp dir: data/ (the cluster), socket/, server.log
        self.data = base / "data"
        self.log = base / "server.log"
        self.host = "127.0.0.1"
        self.port = port
        self.as_user = as_user  # the OS user the server runs as when we are root; None: ourselves
        self._stopped = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        # cwd: the postgres user may not be able to enter ours (pg_ctl complains about it).
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base,
                              env={**os.environ, "LC_ALL": "C", "LANG": "C"})

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (the form Store.open takes)."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and '_' only")
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even while connections are open (a test's leftover pool, a killed subprocess)."""
        self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: PostgreSQL 13 and newer

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if (self.data / "postmaster.pid").exists():
                try:
                    done = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w",
                                     "-t", str(STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S + 10)
                    failed = done.returncode != 0
                except subprocess.TimeoutExpired:
                    failed = True
                if failed:
                    self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w",
                              "-t", str(STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S + 10)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(attempts: int = 3) -> PostgresServer:
    """initdb a fresh cluster in a temp dir and start it on a free port of 127.0.0.1 (bounded: timeouts)."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl): not from `pg_config --bindir`, not in "
            "/usr/lib/postgresql/*/bin, not on PATH; install them (Debian: apt-get install postgresql)")
    as_user = None
    if os.geteuid() == 0:  # initdb and pg_ctl refuse root
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise PostgresUnavailable(f"running as root and there is no `{SUPERUSER}` OS user to run "
                                      f"{bindir}/initdb as (initdb refuses root)") from None
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root without `runuser` to run initdb as the postgres user")
        as_user = SUPERUSER

    base = Path(tempfile.mkdtemp(prefix="tunelab-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    os.chmod(base, 0o755)  # mkdtemp makes it 0700; the server user must traverse it
    (base / "socket").mkdir()
    if as_user:
        entry = pwd.getpwnam(as_user)
        for path in (base, base / "socket"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir, base, 0, as_user)
    atexit.register(server.stop)
    try:
        done = server._run("initdb", "-D", str(server.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                           "--no-locale", "--no-sync", timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        with open(server.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tunelab tests (tests/postgres.py)\n"
                       "listen_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{base / 'socket'}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 100\n")
        for attempt in range(attempts):  # a free port can be taken between finding it and binding it
            server.port = _free_port()
            done = server._run("pg_ctl", "start", "-D", str(server.data), "-l", str(server.log), "-w",
                               "-t", str(START_TIMEOUT_S), "-o", f"-p {server.port}",
                               timeout=START_TIMEOUT_S + 10)
            if done.returncode == 0:
                return server
            if attempt == attempts - 1 or "could not bind" not in server.log_tail():
                raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}\n{done.stderr}\n"
                                   f"server log:\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise
    raise AssertionError("unreachable")
