"""An attacker who can write the database (issue 12, points 1, 2, 3, 5): each exploit is run for
real against the store's own database (SQLite file or PostgreSQL server), then the command
that used to be fooled is run and checked.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from registry.errors import RegistryError


def sql(reg, statement: str, **params) -> list:
    """Run one statement on the store's database from outside the registry (as an attacker)."""
    eng = create_engine(reg.url)
    try:
        with eng.begin() as c:
            res = c.execute(text(statement), params)
            return res.all() if res.returns_rows else []
    finally:
        eng.dispose()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def pushed(reg, make_adapter):
    """t/a:1 (meta, base, tag prod), t/a:2 (child of 1), t/b:1; returns their version ids."""
    reg.push(make_adapter("a1", seed=1), "t/a", base_model="org/base", meta={"ds": "alpaca"}, tags=["prod"])
    reg.push(make_adapter("a2", seed=2), "t/a", parent="t/a:1", meta={"ds": "clean"})
    reg.push(make_adapter("b1", seed=3), "t/b")
    return {ref: reg.resolve(ref).id for ref in ("t/a:1", "t/a:2", "t/b:1")}


# ----------------------------------------------------------------------------- 1: path traversal

@pytest.mark.parametrize("evil", ["../../../escaped.txt", "ABS", "sub/../../escaped.txt", "a\nb"])
def test_pull_refuses_stored_paths_that_leave_the_folder(evil, reg, pushed, run_cli, tmp_path):
    if evil == "ABS":
        evil = str(tmp_path / "escaped-abs.txt")
    sql(reg, "UPDATE version_files SET path = :p WHERE version_id = :v AND path = 'adapter_config.json'",
        p=evil, v=pushed["t/a:1"])
    dest = tmp_path / "x" / "y" / "pulled"
    before = tree(tmp_path)
    r = run_cli("pull", "t/a:1", "-o", dest)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "file name" in r.err, r.err
    assert tree(tmp_path) - before <= {"x", "x/y"}  # nothing written anywhere, no temp left
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "escaped-abs.txt").exists()
    with pytest.raises(RegistryError, match="file name"):
        reg.materialize("t/a:1")


def test_push_and_register_refuse_paths_that_are_not_plain(reg, make_adapter, tmp_path):
    folder = make_adapter("odd")
    (folder / "notes\n.txt").write_text("x")
    with pytest.raises(RegistryError, match="control characters"):
        reg.push(folder, "t/odd")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    digest = "sha256:" + "0" * 64
    for rel in ("../x", "/etc/passwd", "a//b", "./a", ""):
        with pytest.raises(RegistryError):
            reg.register_artifact(kind="safetensors", path=out, files={rel: digest}, recipe={}, inputs=[])


# ----------------------------------------------------------------------------- 2: digests as paths

def test_materialize_never_builds_a_path_from_a_stored_digest(reg, pushed, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    sql(reg, "UPDATE versions SET digest = :d WHERE id = :v", d="sha256:../../victim", v=pushed["t/a:1"])
    with pytest.raises(RegistryError, match="malformed digest"):
        reg.materialize("t/a:1")
    assert (victim / "keep.txt").read_text() == "precious"


def test_blob_digests_are_validated_where_read(reg, pushed, run_cli, tmp_path):
    evil = "sha256:" + ("../" * 21 + "x")
    assert len(evil) == 71
    sql(reg, "INSERT INTO blobs (digest, size, created) VALUES (:d, 1, CURRENT_TIMESTAMP)", d=evil)
    sql(reg, "UPDATE version_files SET blob = :d WHERE version_id = :v AND path = 'adapter_config.json'",
        d=evil, v=pushed["t/a:1"])
    r = run_cli("pull", "t/a:1", "-o", tmp_path / "out")
    assert r.code == 2 and "malformed digest" in r.err and not (tmp_path / "out").exists()
    r = run_cli("verify")
    assert r.code == 1 and "malformed digest" in r.out


# ----------------------------------------------------------------------------- 3: verify recomputes rows

def _artifact(reg, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    return reg.register_artifact(kind="safetensors", path=out, recipe={"dtype": "float16"},
                                 inputs=[("t/a:2", 0.5)], report=None)


def _files(reg, vid):
    return dict(sql(reg, "SELECT path, blob FROM version_files WHERE version_id = :v", v=vid))


def _repoint_consistently(reg, ids):
    """Point t/a:1's weights at t/b:1's blob AND rewrite t/a:1's digest to match (a careful attacker)."""
    from registry.api import manifest_digest

    other = _files(reg, ids["t/b:1"])["adapter_model.safetensors"]
    sql(reg, "UPDATE version_files SET blob = :b WHERE version_id = :v AND path = 'adapter_model.safetensors'",
        b=other, v=ids["t/a:1"])
    files = _files(reg, ids["t/a:1"])
    sql(reg, "UPDATE versions SET digest = :d WHERE id = :v", d=manifest_digest(files), v=ids["t/a:1"])


def _delete_version(reg, vid):
    for t in ("aliases", "version_meta", "version_files"):
        sql(reg, f"DELETE FROM {t} WHERE version_id = :v", v=vid)
    sql(reg, "DELETE FROM versions WHERE id = :v", v=vid)


TAMPER = {
    "file re-pointed": (lambda reg, ids: sql(
        reg, "UPDATE version_files SET blob = :b WHERE version_id = :v AND path = 'adapter_model.safetensors'",
        b=_files(reg, ids["t/b:1"])["adapter_model.safetensors"], v=ids["t/a:1"]), "do not add up"),
    "file re-pointed with its digest": (_repoint_consistently, "differs from what its push recorded"),
    "digest changed": (lambda reg, ids: sql(reg, "UPDATE versions SET digest = :d WHERE id = :v",
                                            d="sha256:" + "ab" * 32, v=ids["t/a:1"]), "do not add up"),
    "metadata changed": (lambda reg, ids: (
        sql(reg, "UPDATE versions SET meta = :m WHERE id = :v", m='{"ds":"evil"}', v=ids["t/a:1"]),
        sql(reg, "UPDATE version_meta SET value = 'evil' WHERE version_id = :v", v=ids["t/a:1"])),
        "differs from what its push recorded"),
    "where index changed": (lambda reg, ids: sql(reg, "UPDATE version_meta SET value = 'evil' WHERE version_id = :v",
                                                 v=ids["t/a:1"]), "index rows differ"),
    "spec changed": (lambda reg, ids: sql(reg, "UPDATE versions SET spec = :s, r = 64 WHERE id = :v",
                                          s='{"kind":"lora","r":64}', v=ids["t/a:1"]), "push recorded"),
    "base changed": (lambda reg, ids: sql(reg, "UPDATE versions SET base_model = 'org/other' WHERE id = :v",
                                          v=ids["t/a:1"]), "push recorded"),
    "base digests changed": (lambda reg, ids: sql(reg, "UPDATE versions SET base_files = :f WHERE id = :v",
                                                  f='{"m.safetensors":"sha256:' + "0" * 64 + '"}',
                                                  v=ids["t/a:1"]), "push recorded"),
    "parent dropped": (lambda reg, ids: sql(reg, "UPDATE versions SET parent_id = NULL WHERE id = :v",
                                            v=ids["t/a:2"]), "push recorded"),
    "file size changed": (lambda reg, ids: sql(reg, "UPDATE version_files SET size = 1 WHERE version_id = :v",
                                               v=ids["t/a:1"]), "push recorded"),
    "file mode changed": (lambda reg, ids: sql(reg, "UPDATE version_files SET mode = 438 WHERE version_id = :v",
                                               v=ids["t/a:1"]), "recorded at push"),
    "alias moved": (lambda reg, ids: sql(reg, "UPDATE aliases SET version_id = :v WHERE alias = 'prod'",
                                         v=ids["t/a:2"]), "alias t/a@prod"),
    "alias added": (lambda reg, ids: sql(
        reg, "INSERT INTO aliases (name_id, alias, version_id, updated) "
             "SELECT name_id, 'staging', id, CURRENT_TIMESTAMP FROM versions WHERE id = :v", v=ids["t/b:1"]),
        "alias t/b@staging"),
    "alias removed": (lambda reg, ids: sql(reg, "DELETE FROM aliases WHERE alias = 'prod'"), "alias t/a@prod"),
    "version deleted": (lambda reg, ids: _delete_version(reg, ids["t/b:1"]), "deleted without an audit event"),
    "version inserted": (lambda reg, ids: sql(
        reg, "INSERT INTO versions (name_id, number, digest, kind, r, mora_type, spec, base_model, base_revision, "
             "base_files, parent_id, meta, author, message, created, size) SELECT name_id, 7, :d, kind, r, "
             "mora_type, spec, base_model, base_revision, base_files, NULL, meta, author, message, created, size "
             "FROM versions WHERE id = :v", d="sha256:" + "cd" * 32, v=ids["t/b:1"]), "no push event"),
    "artifact recipe changed": (lambda reg, ids: sql(reg, "UPDATE artifacts SET recipe = :r", r='{"dtype":"x"}'),
                                "register event"),
    "artifact path changed": (lambda reg, ids: sql(reg, "UPDATE artifacts SET path = '/elsewhere'"),
                              "register event"),
    "artifact weight changed": (lambda reg, ids: sql(reg, "UPDATE artifact_inputs SET weight = 9"), "register event"),
    "artifact deleted": (lambda reg, ids: (sql(reg, "DELETE FROM artifact_inputs"), sql(reg, "DELETE FROM artifacts")),
                         "deleted without an audit event"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_verify_catches_rewritten_rows(case, reg, pushed, tmp_path, run_cli):
    _artifact(reg, tmp_path)
    assert reg.verify().ok, reg.verify().problems  # the control: an untouched store passes
    tamper, needle = TAMPER[case]
    tamper(reg, pushed)
    rep = reg.verify()
    assert not rep.ok and any(needle in p for p in rep.problems), rep.problems
    r = run_cli("verify")
    assert r.code == 1 and needle in r.out


KEY = "k" * 32


def _rewrite_history(reg, ids):
    """Change t/a:1's metadata and make the push event and the whole chain agree (no key needed)."""
    from registry import audit, records

    sql(reg, "UPDATE versions SET meta = :m WHERE id = :v", m='{"ds":"evil"}', v=ids["t/a:1"])
    sql(reg, "UPDATE version_meta SET value = 'evil' WHERE version_id = :v", v=ids["t/a:1"])
    with reg._read() as s:
        from registry.models import Version

        row = records.content_digest(records.version_content(s, s.get(Version, ids["t/a:1"])))
    events = sql(reg, "SELECT seq, at, actor, action, subject, name, details FROM audit_events ORDER BY seq")
    prev = audit.GENESIS
    for seq, at, who, action, subject, name, details in events:
        if action == "push" and subject == "t/a:1":
            d = json.loads(details)
            d["row"] = row
            details = audit.canonical(d)
        h = audit.event_hash(prev, seq, at, who, action, subject, name, details)
        sql(reg, "UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h WHERE seq = :s",
            d=details, p=prev, h=h, s=seq)
        prev = h
    sql(reg, "UPDATE registry_state SET audit_head = :h", h=prev)


def test_history_rewritten_with_the_chain_needs_the_key(reg, make_adapter, tmp_path, monkeypatch):
    """Documented limit: without a key a full rewrite passes; with ADAPTERS_AUDIT_KEY it is caught."""
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", KEY)
    reg.push(make_adapter("a1", seed=1), "t/a", meta={"ds": "alpaca"})
    ids = {"t/a:1": reg.resolve("t/a:1").id}
    assert reg.verify().ok
    _rewrite_history(reg, ids)
    monkeypatch.delenv("ADAPTERS_AUDIT_KEY")
    rep = reg.verify()
    assert rep.ok and any("ADAPTERS_AUDIT_KEY" in w for w in rep.warnings), rep.problems  # undetectable
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", KEY)
    rep = reg.verify()
    assert not rep.ok and any("does not match its signature" in p for p in rep.problems), rep.problems
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", "another-key-of-32-characters-xxx")
    assert not reg.verify().ok


def test_a_write_without_the_key_leaves_the_head_unsigned(reg, make_adapter, monkeypatch):
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", KEY)
    reg.push(make_adapter("a1", seed=1), "t/a")
    assert reg.verify().ok
    monkeypatch.delenv("ADAPTERS_AUDIT_KEY")
    reg.tag("t/a:1", "prod")  # a writer without the key (or an attacker appending)
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", KEY)
    rep = reg.verify()
    assert not rep.ok and any("not signed" in p for p in rep.problems)
    monkeypatch.setenv("ADAPTERS_AUDIT_KEY", "short")
    with pytest.raises(RegistryError, match="shorter than"):
        reg.tag("t/a:1", "staging")


# ----------------------------------------------------------------------------- 5: permissions

def test_new_home_and_database_are_private(tmp_path, monkeypatch):
    from registry.api import Registry

    monkeypatch.delenv("ADAPTERS_HOME_MODE", raising=False)
    monkeypatch.delenv("ADAPTERS_DB_URL", raising=False)
    home = tmp_path / "new" / "home"
    with Registry.open(home) as r:
        r.list()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for f in home.glob("registry.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    monkeypatch.setenv("ADAPTERS_HOME_MODE", "0750")
    shared = tmp_path / "shared"
    with Registry.open(shared) as r:
        r.list()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750
    assert stat.S_IMODE((shared / "registry.db").stat().st_mode) == 0o640


def test_pulled_files_keep_the_sources_restrictiveness(reg, make_adapter, tmp_path):
    folder = make_adapter("private")
    os.chmod(folder / "adapter_model.safetensors", 0o600)
    os.chmod(folder / "adapter_config.json", 0o644)
    reg.push(folder, "t/private")
    for f in reg.resolve("t/private").files:
        assert stat.S_IMODE(reg.blobs.path(f["digest"]).stat().st_mode) == 0o444
    out = reg.pull("t/private", tmp_path / "pulled")
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "adapter_config.json").stat().st_mode) == 0o644 & ~_umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # one private file: a private folder


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m
