"""`tunelab keys create|list|revoke` as a user runs them: the key printed once, never listed, revoked by prefix."""

from __future__ import annotations

import json

from helpers import cli


def test_create_list_and_revoke_a_key(tmp_path):
    storage = ["--storage", str(tmp_path / "service")]
    created = cli("keys", "create", "--project", "support", "--name", "ci", "--rpm", "60", *storage, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("tl-") and len(secret) > 40 and "not shown again" in created.stderr
    listed = cli("keys", "list", "--json", *storage, cwd=tmp_path)
    (row,) = json.loads(listed.stdout)
    assert row["project"] == "support" and row["name"] == "ci" and row["requests_per_minute"] == 60
    assert secret.startswith(row["prefix"]) and secret not in listed.stdout and row["revoked_at"] is None
    assert cli("keys", "revoke", row["prefix"], *storage, cwd=tmp_path).returncode == 0
    (row,) = json.loads(cli("keys", "list", "--json", *storage, cwd=tmp_path).stdout)
    assert isinstance(row["revoked_at"], int)
    missing = cli("keys", "revoke", "key_nope", *storage, cwd=tmp_path)
    assert missing.returncode == 2 and "no key with id or prefix" in missing.stderr
    bad = cli("keys", "create", "--project", "Not A Name", *storage, cwd=tmp_path)
    assert bad.returncode == 2 and "project name" in bad.stderr
