"""The model registry: NAME@VERSION -> a frozen copy of a finished run, aliases, promote and rollback.

    tunelab models register runs/banking77-20261122-101500 --name banking   # prints banking@1
    tunelab models promote banking@1 --alias production                    # only if eval.json says it beats the base
    tunelab models rollback banking --alias production                     # back to the version before that promote
    tunelab models log banking                                             # who did what, when and why

Layout (REGISTRY = --registry DIR, else $TUNELAB_REGISTRY, else $TUNELAB_HOME/registry):

    REGISTRY/
      .registry.sqlite   the index: versions, alias history, event log (a name cannot start with '.')
      .staging/          copies in progress, renamed into place: a version folder is whole or absent
      banking/1/         adapter/, tokenizer/, config.json, data.json, metrics.jsonl, eval.json, report.*,
                         manifest.json (the run's, verified) and version.json (what the registry recorded)

A version is a copy, not a pointer, so deleting runs/ loses nothing registered; checkpoints/
(optimizer state for resuming) are left behind. Version numbers are never reused, even
after a delete: banking@3 always means the same bytes.

Why SQLite for the index (stdlib `sqlite3`, not SQLAlchemy: four small tables need no ORM
and no dependency): `BEGIN IMMEDIATE` takes the database's write lock before reading the
last version number, so two processes registering the same name at once are serialised
and get distinct versions, and a change to the index plus its event-log line commit
together or not at all. A JSON index under `fcntl.flock` would do the same by hand, and
only on POSIX. (SQLite locking needs a local filesystem, not NFS: keep REGISTRY local.)
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluation.result import EvalResult
from tunelab.io import MANIFEST, file_sha256, registry_root
from tunelab.model.template_canary import tokenizer_identity
from tunelab.registry.gate import GateResult, eval_summary, gate
from tunelab.rundir import HELD_OUT, Manifest, RunDir, finished

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
ALIAS_RE = re.compile(r"[a-z][a-z0-9._-]*")  # starts with a letter, so NAME@3 is always a version number
LATEST = "latest"  # NAME@latest, like NAME alone: the newest version
DEFAULT_ALIAS = "production"
INDEX = ".registry.sqlite"
REQUIRED = ("tokenizer/tokenizer_config.json", "config.json", "data.json")
TRAINED = ("adapter/adapter_config.json", "model/config.json")  # one of them: an adapter, or a fully tuned model
NOT_COPIED = ("checkpoints",)  # optimizer state for `tunelab train --resume`: large, and not needed to serve

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions (name TEXT NOT NULL, version INTEGER NOT NULL, created TEXT NOT NULL,"
    " record TEXT NOT NULL, PRIMARY KEY (name, version))",
    # Every promote pushes a row, every rollback pops the newest: the alias is the top of its stack.
    "CREATE TABLE IF NOT EXISTS alias_stack (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,"
    " alias TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, actor TEXT NOT NULL,"
    " name TEXT NOT NULL, action TEXT NOT NULL, version INTEGER, alias TEXT, reason TEXT, detail TEXT NOT NULL)",
)


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: Path  # REGISTRY/NAME/VERSION
    record: dict[str, Any]  # version.json: everything recorded at registration
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def evaluation(self) -> EvalResult | None:
        """The version's held-out evaluation (what the gate reads), or None when it was never evaluated."""
        path = self.path / HELD_OUT
        return EvalResult.read(path) if path.is_file() else None


@dataclass(frozen=True)
class Event:
    time: str  # UTC, ISO 8601
    actor: str
    name: str
    action: str  # register | promote | rollback | delete
    version: int | None
    alias: str | None
    reason: str | None
    detail: dict[str, Any]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'banking' -> ('banking', None); 'banking@3' -> ('banking', '3'); 'banking@production' -> alias."""
    name, at, selector = ref.partition("@")
    validate_name(name)
    if at and not (selector.isdigit() or ALIAS_RE.fullmatch(selector)):
        raise TunelabError(f"'{ref}' is not NAME, NAME@VERSION or NAME@ALIAS",
                           fix="write e.g. banking, banking@3 or banking@production")
    return name, selector if at else None


def validate_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or len(name) > 100:
        raise TunelabError(f"'{name}' is not a valid model name",
                           fix="use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit "
                               "(at most 100 characters), e.g. banking77-lora")


def validate_alias(alias: str) -> None:
    if not ALIAS_RE.fullmatch(alias) or alias == LATEST or len(alias) > 100:
        raise TunelabError(f"'{alias}' is not a valid alias",
                           fix="use lowercase letters, digits, '.', '_' and '-', starting with a letter; "
                               f"'{LATEST}' is reserved (e.g. production, staging)")


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else registry_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._schema_ready = False

    # ------------------------------------------------------------------ register
    def register(self, run_dir: Path, name: str, note: str | None = None) -> Version:
        """Verify a finished run against its manifest, copy it in as NAME@(last + 1), log the event."""
        validate_name(name)
        run_dir = Path(run_dir).resolve()
        manifest = _read_manifest(run_dir)
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging))
        final: Path | None = None
        try:
            # The slow part (copy, hash, tokenizer) runs before taking the lock, so it never blocks others.
            files = _copy_verified(run_dir, manifest, tmp)
            record = _build_record(tmp, run_dir, note, files)
            try:
                with self._tx() as db:
                    row = db.execute("SELECT last_version FROM names WHERE name = ?", (name,)).fetchone()
                    version = (row[0] if row else 0) + 1
                    db.execute("INSERT INTO names VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET last_version = ?",
                               (name, version, version))
                    record = {"name": name, "version": version, "created": _now(), **record}
                    _write_json(tmp / "version.json", record)
                    db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)",
                               (name, version, record["created"], json.dumps(record)))
                    self._event(db, name, "register", version, None, note, {"source": str(run_dir)})
                    final = self.root / name / str(version)
                    if final.exists():  # left by a crash between rename and commit: no index row points at it
                        shutil.rmtree(final)
                    final.parent.mkdir(exist_ok=True)
                    tmp.rename(final)
            except BaseException:
                if final is not None and final.exists() and not tmp.exists():
                    final.rename(tmp)  # the commit failed: the folder must not outlive its index row
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Version(name, version, final, record)

    # ------------------------------------------------------------------ read
    def resolve(self, ref: str) -> Version:
        """NAME (the latest version), NAME@latest, NAME@VERSION or NAME@ALIAS -> that version."""
        name, selector = parse_ref(ref)
        with self._tx(write=False) as db:
            rows = db.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))
            numbers = [v for (v,) in rows]
            aliases = self._aliases(db, name)
            if not numbers:
                names = [n for (n,) in db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
                raise TunelabError(f"no model '{name}' in the registry", where=str(self.root),
                                   fix=f"registered names: {', '.join(names) or 'none yet'}; add one with "
                                       f"`tunelab models register RUN_DIR --name {name}`")
            if selector is None or selector == LATEST:
                number = numbers[-1]
            elif selector.isdigit():
                number = int(selector)
                if number not in numbers:
                    raise TunelabError(f"{name}@{number} does not exist", where=str(self.root),
                                       fix=f"versions of {name}: {', '.join(map(str, numbers))}")
            elif selector in aliases:
                number = aliases[selector]
            else:
                have = ", ".join(f"{a} -> {name}@{v}" for a, v in sorted(aliases.items())) or "none"
                raise TunelabError(f"{name} has no alias '{selector}'", where=str(self.root),
                                   fix=f"aliases of {name}: {have}; set one with "
                                       f"`tunelab models promote {name}@VERSION --alias {selector}`")
            (record,) = db.execute("SELECT record FROM versions WHERE name = ? AND version = ?",
                                   (name, number)).fetchone()
        pointing = tuple(sorted(a for a, v in aliases.items() if v == number))
        return Version(name, number, self.root / name / str(number), json.loads(record), pointing)

    def versions(self, name: str | None = None) -> list[Version]:
        """Every version (of one name), oldest first, with the aliases pointing at each."""
        if name is not None:
            validate_name(name)
        with self._tx(write=False) as db:
            rows = db.execute("SELECT name, version, record FROM versions WHERE ?1 IS NULL OR name = ?1 "
                              "ORDER BY name, version", (name,)).fetchall()
            aliases = {n: self._aliases(db, n) for n in {r[0] for r in rows}}
        return [Version(n, v, self.root / n / str(v), json.loads(rec),
                        tuple(sorted(a for a, t in aliases[n].items() if t == v))) for n, v, rec in rows]

    def aliases(self, name: str) -> dict[str, int]:
        validate_name(name)
        with self._tx(write=False) as db:
            return self._aliases(db, name)

    def events(self, name: str) -> list[Event]:
        validate_name(name)
        with self._tx(write=False) as db:
            rows = db.execute("SELECT time, actor, name, action, version, alias, reason, detail FROM events "
                              "WHERE name = ? ORDER BY id", (name,)).fetchall()
        if not rows:
            self.resolve(name)  # raises the unknown-name error, listing the names there are
        return [Event(*row[:7], json.loads(row[7])) for row in rows]

    # ------------------------------------------------------------------ aliases
    def promote(self, ref: str, alias: str = DEFAULT_ALIAS, reason: str | None = None,
                force: bool = False) -> tuple[Version, int | None, GateResult]:
        """Point NAME@ALIAS at a version that passes `gate` (or any, with force and a reason).

        Returns (the version, the version the alias pointed at before or None, the gate's verdict).
        """
        validate_alias(alias)
        if force and not (reason and reason.strip()):
            raise TunelabError("--force needs --reason", fix="say why the gate is overridden, e.g. "
                                                             "--force --reason 'hotfix, eval rerun tomorrow'")
        v = self.resolve(ref)
        verdict = gate(v.evaluation())
        if not verdict.ok and not force:
            raise TunelabError(f"{v.ref} may not become {v.name}@{alias}: " + "; ".join(verdict.reasons),
                               where=str(v.path / HELD_OUT),
                               fix="improve the fine-tune (see its report), evaluate and register it again; or "
                                   "override knowingly with --force --reason '...' (both go to the event log)")
        with self._tx() as db:
            if not self._exists(db, v):
                raise TunelabError(f"{v.ref} was deleted meanwhile", fix="promote another version")
            previous = self._aliases(db, v.name).get(alias)
            if previous != v.version:
                db.execute("INSERT INTO alias_stack (name, alias, version) VALUES (?, ?, ?)",
                           (v.name, alias, v.version))
                self._event(db, v.name, "promote", v.version, alias, reason,
                            {"from": previous, "gate_ok": verdict.ok, "forced": force and not verdict.ok,
                             "overridden": [] if verdict.ok else verdict.reasons})
        return v, previous, verdict

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, reason: str | None = None) -> tuple[int, int]:
        """Move NAME@ALIAS back to where it pointed before its latest promote. Returns (from, to)."""
        validate_name(name)
        validate_alias(alias)
        with self._tx() as db:
            stack = db.execute("SELECT id, version FROM alias_stack WHERE name = ? AND alias = ? ORDER BY id",
                               (name, alias)).fetchall()
            if len(stack) < 2:
                now = f"it points at {name}@{stack[0][1]}, its first promotion" if stack else "it was never set"
                raise TunelabError(f"nothing to roll {name}@{alias} back to: {now}", where=str(self.root),
                                   fix=f"promote the version you want: tunelab models promote {name}@VERSION "
                                       f"--alias {alias}; `tunelab models log {name}` shows the history")
            db.execute("DELETE FROM alias_stack WHERE id = ?", (stack[-1][0],))
            self._event(db, name, "rollback", stack[-2][1], alias, reason, {"from": stack[-1][1]})
        return stack[-1][1], stack[-2][1]

    def delete(self, ref: str, force: bool = False, reason: str | None = None) -> Version:
        """Delete one version (NAME@VERSION, never a bare NAME). An alias on it refuses, unless force removes it."""
        name, selector = parse_ref(ref)
        if selector is None or not selector.isdigit():
            raise TunelabError(f"'{ref}' does not name one version", fix=f"write the number: {name}@VERSION")
        v = self.resolve(ref)
        trash = self.root / ".staging" / f"deleted-{name}-{v.version}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        moved = False
        try:
            with self._tx() as db:
                if not self._exists(db, v):
                    raise TunelabError(f"{v.ref} was deleted meanwhile", fix=f"`tunelab models list {name}`")
                pointing = sorted(a for a, t in self._aliases(db, name).items() if t == v.version)
                if pointing and not force:
                    raise TunelabError(
                        f"{v.ref} is what {', '.join(f'{name}@{a}' for a in pointing)} points at", where=str(self.root),
                        fix="promote another version or roll back first, or pass --force (which removes the alias)")
                # A forced delete removes the alias outright (never a silent move to an older version), and
                # the deleted version leaves every alias history, so no rollback can land on it.
                for alias in pointing:
                    db.execute("DELETE FROM alias_stack WHERE name = ? AND alias = ?", (name, alias))
                db.execute("DELETE FROM alias_stack WHERE name = ? AND version = ?", (name, v.version))
                db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, v.version))
                self._event(db, name, "delete", v.version, None, reason, {"aliases_removed": pointing})
                v.path.rename(trash)
                moved = True
        except BaseException:
            if moved:
                trash.rename(v.path)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return v

    # ------------------------------------------------------------------ index
    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; `write` takes the write lock up front (BEGIN IMMEDIATE), so read-then-write is safe."""
        db = sqlite3.connect(self.root / INDEX, timeout=60, isolation_level=None)  # we issue BEGIN/COMMIT
        try:
            if not self._schema_ready:  # idempotent, once per Registry: whichever process is first creates it
                db.execute("BEGIN IMMEDIATE")
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute("COMMIT")
                self._schema_ready = True
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _exists(db: sqlite3.Connection, v: Version) -> bool:
        """Still registered? (Checked again inside a write transaction: another process may have deleted it.)"""
        row = db.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", (v.name, v.version)).fetchone()
        return row is not None

    @staticmethod
    def _aliases(db: sqlite3.Connection, name: str) -> dict[str, int]:
        rows = db.execute("SELECT alias, version FROM alias_stack WHERE id IN "
                          "(SELECT MAX(id) FROM alias_stack WHERE name = ? GROUP BY alias)", (name,))
        return dict(rows.fetchall())

    @staticmethod
    def _event(db: sqlite3.Connection, name: str, action: str, version: int | None, alias: str | None,
               reason: str | None, detail: dict[str, Any]) -> None:
        db.execute("INSERT INTO events (time, actor, name, action, version, alias, reason, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (_now(), _actor(), name, action, version, alias, reason, json.dumps(detail)))


# ---------------------------------------------------------------------- run -> record
def _read_manifest(run_dir: Path) -> Manifest:
    manifest = finished(run_dir).manifest()
    missing = [f for f in REQUIRED if f not in manifest.files]
    if not any(f in manifest.files for f in TRAINED):
        missing.append(" or ".join(TRAINED))
    if missing:
        raise TunelabError(f"{MANIFEST} does not list {', '.join(missing)}", where=str(run_dir / MANIFEST),
                           fix="pass a run directory written by `tunelab train`")
    return manifest


def _copy_verified(run_dir: Path, manifest: Manifest, dest: Path) -> dict[str, str]:
    """Copy every manifest file but checkpoints/; hash the *copy*, so what is registered is what was verified."""
    copied = {}
    for rel, entry in sorted(manifest.files.items()):
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise TunelabError(f"{MANIFEST} lists '{rel}', outside the run", where=str(run_dir / MANIFEST),
                               fix="pass a run directory written by `tunelab train`")
        if parts[0] in NOT_COPIED:
            continue
        if not (run_dir / rel).is_file():
            raise TunelabError(f"{rel} is listed in {MANIFEST} but missing", where=str(run_dir),
                               fix="restore the file, or retrain: the run changed after it finished")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / rel, dest / rel)
        digest = file_sha256(dest / rel)
        if digest != entry.sha256:
            raise TunelabError(f"{rel} does not match its sha256 in {MANIFEST}: it changed after the run finished",
                               where=str(run_dir / rel),
                               fix="restore the file or retrain: a registered version must be exactly what was "
                                   "trained and evaluated")
        copied[rel] = digest
    shutil.copyfile(run_dir / MANIFEST, dest / MANIFEST)
    return copied


def _build_record(folder: Path, source: Path, note: str | None, files: dict[str, str]) -> dict[str, Any]:
    copy = RunDir(folder)
    data = copy.data()
    eval_path = folder / HELD_OUT
    return {
        "format": "tunelab-registry/1",
        "source": str(source),
        "note": note,
        "registered_by": _actor(),
        "base_model": data.base_model.model_dump(),  # {spec, path, weights}: weights is a fingerprint of the files
        "tokenizer": tokenizer_identity(folder / "tokenizer"),
        "data": {"sha256": data.sha256, "path": data.path, "rows": data.rows, "splits": data.splits},
        "config": copy.config().model_dump(mode="json"),
        "eval": eval_summary(EvalResult.read(eval_path) if eval_path.is_file() else None),
        "files": files,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")  # inside a staging folder: renamed whole


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers): still log the change
        return f"uid-{os.getuid()}"
