"""The store's file digest cache (registry.file_digests), on SQLite and PostgreSQL: digests are
sha256 of the bytes; an unchanged file is answered from the table without being read; a change
of size, mtime, ctime or inode invalidates its entry; freshly stamped files are not cached;
check_base and push use it; register_artifact takes caller digests without reading.

"Served from the table" is shown without spying on the hash function: the cached row is
overwritten with a forged digest, and an answer carrying the forgery cannot come from the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from registry.errors import RegistryError
from registry.file_digests import FINE_NS
from registry.models import FileDigest

FORGED = "sha256:" + "f" * 64


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _settle() -> None:
    """Let fresh stamps age past one timestamp tick, so their digests may be cached."""
    time.sleep(2 * FINE_NS / 1e9)


def _rows(reg) -> dict[str, str]:
    with reg._read() as s:
        return {r.path: r.digest for r in s.scalars(select(FileDigest))}


def _forge(reg, path: Path, **identity: int) -> None:
    """Overwrite the cached row of `path`: a forged digest, and optionally other identity values."""
    with reg._write() as s, s.begin():
        n = s.execute(update(FileDigest).where(FileDigest.path == str(path.resolve()))
                      .values(digest=FORGED, **identity))
        assert n.rowcount == 1


def _files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate((0, 1000, 3 << 20)):
        p = folder / f"model-{i}.safetensors"
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


def test_digests_are_sha256_and_unchanged_files_are_served_from_the_table(reg, tmp_path):
    files = _files(tmp_path / "base")
    _settle()
    got = reg.file_digests(files)
    assert list(got) == [p.name for p in files]  # keyed by file name, in the given order
    assert got == {p.name: _sha(p) for p in files}
    assert _rows(reg) == {str(p.resolve()): _sha(p) for p in files}
    for p in files:
        _forge(reg, p)
    assert reg.file_digests(files) == {p.name: FORGED for p in files}  # not one byte read


@pytest.mark.parametrize("column", ["size", "mtime_ns", "ctime_ns", "inode"])
def test_each_identity_field_is_checked(column, reg, tmp_path):
    """An entry differing from the file in one field only is not used (and is replaced)."""
    p = _files(tmp_path / "base")[1]
    _settle()
    reg.file_digests([p])
    with reg._read() as s:
        row = s.get(FileDigest, str(p.resolve()))
        value = getattr(row, column)
    _forge(reg, p, **{column: value + 1})
    assert reg.file_digests([p]) == {p.name: _sha(p)}
    with reg._read() as s:
        assert getattr(s.get(FileDigest, str(p.resolve())), column) == value


@pytest.mark.parametrize("change", ["mtime", "size", "inode", "ctime"])
def test_a_changed_file_invalidates_the_entry(change, reg, tmp_path):
    p = _files(tmp_path / "base")[1]
    _settle()
    reg.file_digests([p])
    _forge(reg, p)
    assert reg.file_digests([p]) == {p.name: FORGED}
    st = os.stat(p)
    if change == "mtime":  # same bytes, same size: only the stamp moves
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    elif change == "size":
        with open(p, "ab") as fh:
            fh.write(b"x")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: the size alone tells
    elif change == "inode":  # replaced by a copy with the same bytes, size and mtime
        shutil.copy2(p, tmp_path / "copy")
        os.replace(tmp_path / "copy", p)
        assert os.stat(p).st_mtime_ns == st.st_mtime_ns and os.stat(p).st_ino != st.st_ino
    else:  # chmod moves ctime only
        os.chmod(p, 0o600)
        assert os.stat(p).st_mtime_ns == st.st_mtime_ns
    _settle()
    assert reg.file_digests([p]) == {p.name: _sha(p)}
    assert _rows(reg)[str(p.resolve())] == _sha(p)  # the entry now describes the new identity


def test_freshly_stamped_files_are_hashed_but_not_cached(reg, tmp_path):
    p = _files(tmp_path / "base")[1]
    future = time.time_ns() + 60 * 10**9  # a stamp at or after the hashing: the same tick could follow
    os.utime(p, ns=(future, future))
    assert reg.file_digests([p]) == {p.name: _sha(p)}
    assert _rows(reg) == {}


def test_bad_paths(reg, tmp_path):
    files = _files(tmp_path / "a")
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / files[0].name
    twin.write_bytes(b"")
    with pytest.raises(RegistryError, match="same file name 'model-0.safetensors'"):
        reg.file_digests([files[0], twin])
    with pytest.raises(RegistryError, match="nope.safetensors: file not found"):
        reg.file_digests([tmp_path / "nope.safetensors"])
    with pytest.raises(RegistryError, match="not a regular file"):
        reg.file_digests([tmp_path / "b"])


def _fitting_model(folder: Path) -> Path:
    """model.safetensors with the q_proj matrices `make_adapter` LoRAs fit (push --base checks the fit)."""
    import numpy as np
    from safetensors.numpy import save_file

    p = folder / "model.safetensors"
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": np.zeros((16, 16), np.float32) for i in range(2)}, str(p))
    return p


def test_check_base_and_push_use_the_cache(reg, make_adapter, tmp_path):
    base = tmp_path / "base"
    files = _files(base) + [_fitting_model(base)]
    _settle()
    v = reg.push(make_adapter("a"), "x", base_model="tiny", base_dir=base)
    assert reg.resolve(v.ref).base_files == {p.name: _sha(p) for p in files}
    assert reg.check_base("x", base) == []
    _forge(reg, files[2])  # what check_base sees comes from the table: the forgery shows as a difference
    problems = reg.check_base("x", base)
    assert len(problems) == 1 and problems[0].startswith("model-2.safetensors: digest sha256:ffff")
    v2 = reg.push(make_adapter("b", seed=2), "y", base_dir=base)
    assert reg.resolve(v2.ref).base_files["model-2.safetensors"] == FORGED


def test_gc_forgets_entries_of_gone_or_changed_files(reg, tmp_path):
    files = _files(tmp_path / "base")
    _settle()
    reg.file_digests(files)
    files[0].unlink()
    with open(files[1], "ab") as fh:
        fh.write(b"x")
    reg.gc(dry_run=True)
    assert len(_rows(reg)) == 3
    reg.gc()
    assert list(_rows(reg)) == [str(files[2].resolve())]


def test_register_artifact_takes_caller_digests_without_reading(reg, make_adapter, tmp_path):
    reg.push(make_adapter("a"), "x")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"merged")
    (out / "config.json").write_text("{}")
    given = {"model.safetensors": FORGED, "config.json": _sha(out / "config.json")}
    art = reg.register_artifact(kind="safetensors", path=out, files=given, recipe={}, inputs=[("x:1", 1.0)])
    assert art.files == given  # recorded as given: the bytes were not read (they hash otherwise)
    rep = reg.verify()  # verify does read them, and finds the record wrong
    assert any("model.safetensors is altered" in p for p in rep.problems)
    hashed = reg.register_artifact(kind="safetensors", path=out, recipe={}, inputs=[])
    assert hashed.files == {"model.safetensors": _sha(out / "model.safetensors"),
                            "config.json": _sha(out / "config.json")}
    for files, message in [({"model.safetensors": "sha256:abc"}, "malformed digest"),
                           ({"../x": FORGED}, "expected a path relative to"),
                           ({"gone.bin": FORGED}, "gone.bin: artifact file not found"),
                           ({}, "at least one file")]:
        with pytest.raises(RegistryError, match=message):
            reg.register_artifact(kind="safetensors", path=out, files=files, recipe={}, inputs=[])


def test_a_store_before_the_cache_upgrades_itself_and_keeps_its_versions(tmp_path, make_adapter):
    from alembic import command

    from registry.api import Registry
    from registry.db import SCHEMA_HEAD, alembic_config, current_revision

    home = tmp_path / "old"
    with Registry.open(home) as reg:
        v = reg.push(make_adapter("a"), "x")
        with reg.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0002_batch_jobs")
        assert current_revision(reg.engine) == "0002_batch_jobs"
    with Registry.open(home) as reg:
        assert current_revision(reg.engine) == SCHEMA_HEAD
        assert reg.resolve("x").digest == v.digest and reg.verify().ok
        p = make_adapter("a") / "adapter_model.safetensors"
        assert reg.file_digests([p]) == {p.name: _sha(p)}


def test_digests_in_steps_hash_outside_the_database_and_can_be_cancelled(reg, tmp_path):
    """lookup (cache) -> hash (files only) -> finish (records): the same answer as file_digests,
    the cached file not read again; cancel() stops a hash at its next buffer."""
    from registry.copying import BUFFER
    from registry.file_digests import Cancelled

    files = _files(tmp_path / "base")
    big = tmp_path / "base" / "model-big.safetensors"
    big.write_bytes(os.urandom(BUFFER + 1))
    files.append(big)
    _settle()
    reg.file_digests(files[:1])
    _forge(reg, files[0])
    pending = reg.lookup_file_digests(files)
    assert [p.name for p, _, _ in pending.todo] == [p.name for p in files[1:]]
    pending.hash()
    got = reg.finish_file_digests(pending)
    assert got == {files[0].name: FORGED, **{p.name: _sha(p) for p in files[1:]}}
    assert _rows(reg)[str(big.resolve())] == _sha(big)  # recorded by finish

    stopped = reg.lookup_file_digests(files[1:])
    assert stopped.todo == []  # all cached now
    _forge(reg, big, size=1)  # a stale row: the big file is hashed again
    stopped = reg.lookup_file_digests([big])
    stopped.cancel()
    with pytest.raises(Cancelled):
        stopped.hash()
    with pytest.raises(RegistryError, match="not finished"):
        reg.finish_file_digests(stopped)
