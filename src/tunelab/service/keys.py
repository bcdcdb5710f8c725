"""Projects and their bearer keys: `tunelab keys create --project support` prints a key once; the store keeps
its sha256 only.

A project owns files, jobs and fine-tuned models; a key acts for one project. With no key in the store
(and none given with --api-key), the server is open and every request acts for the project `default`:
the single-user setup on 127.0.0.1, as `tunelab serve` always was. The first key created closes it.

Why sha256 and not a slow password hash: a key is 32 random bytes (256 bits), so nobody can guess it
from its hash however fast the hash is; a slow hash would only slow down every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select

from tunelab.errors import TunelabError
from tunelab.service.store import ApiKey, Project, Store, new_id, now

KEY_PREFIX = "tl-"
DEFAULT_PROJECT = "default"
PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    project_id: str
    project: str  # its name
    key_id: str | None  # None: the open server (no keys) or a key given with --api-key
    requests_per_minute: int | None = None
    max_active_jobs: int | None = None


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def project_id(store: Store, name: str, create: bool = True) -> str:
    """The id of the project called `name`, created when `create` and missing."""
    if not PROJECT_RE.fullmatch(name):
        raise TunelabError(f"project name {name!r} is not allowed",
                           fix="use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
    with store.session() as db:
        found = db.scalar(select(Project.id).where(Project.name == name))
        if found is not None:
            return found
        if not create:
            raise TunelabError(f"no project called {name!r}", fix="list the projects with `tunelab keys list`")
        created = Project(id=new_id("proj_"), name=name, created_at=now())
        db.add(created)
        return created.id


def create_key(store: Store, project: str, name: str | None = None, requests_per_minute: int | None = None,
               max_active_jobs: int | None = None) -> tuple[str, ApiKey]:
    """A new key for `project` (created if new): (the secret, shown once; its stored record)."""
    pid = project_id(store, project)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(id=new_id("key_"), project_id=pid, name=name, sha256=key_hash(secret), prefix=secret[:10],
                    created_at=now(), revoked_at=None, requests_per_minute=requests_per_minute,
                    max_active_jobs=max_active_jobs)
    with store.session() as db:
        db.add(record)
    return secret, record


def list_keys(store: Store) -> list[tuple[ApiKey, str]]:
    """Every key with its project's name, oldest first."""
    with store.session() as db:
        rows = db.execute(select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)
                          .order_by(ApiKey.created_at, ApiKey.id)).all()
        return [(key, project) for key, project in rows]


def revoke_key(store: Store, key: str) -> ApiKey:
    """Revoke by id (`key_...`) or by the prefix `tunelab keys list` shows; the next request with it is a 401."""
    with store.session() as db:
        found = db.scalars(select(ApiKey).where((ApiKey.id == key) | (ApiKey.prefix == key))).all()
        if len(found) != 1:
            what = "no key" if not found else f"{len(found)} keys"
            raise TunelabError(f"{what} with id or prefix {key!r}", fix="pass an id from `tunelab keys list`")
        record = found[0]
        if record.revoked_at is None:
            record.revoked_at = now()
        return record


def any_keys(store: Store) -> bool:
    """True once a key was ever created (a revoked key still closes the server: revoking one must not open it)."""
    with store.session() as db:
        return bool(db.scalar(select(func.count()).select_from(ApiKey)))


def principal_for(store: Store, secret: str) -> Principal | None:
    """The project and limits of a live key; None for an unknown or revoked one."""
    with store.session() as db:
        row = db.execute(select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id)
                         .where(ApiKey.sha256 == key_hash(secret))).first()
    if row is None:
        return None
    key, project = row
    # The lookup is by hash (an index), so its time does not depend on how much of the key is right; compare
    # again in constant time anyway, so this line never becomes the one that leaks.
    if key.revoked_at is not None or not hmac.compare_digest(key.sha256, key_hash(secret)):
        return None
    return Principal(key.project_id, project, key.id, key.requests_per_minute, key.max_active_jobs)
