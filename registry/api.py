"""The registry's Python API: `Registry.open(...)` then push / resolve / pull / list / tag /
lineage / verify / gc / audit. Importing this module does not import torch (only a
push validates the adapter with mora_core, which imports it then).

Write transactions are serialised (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the
`registry_state` row lock), which makes version numbers gap-free and the audit chain
linear under concurrent pushes. Bytes go to the blob store before the transaction that
makes a version visible; a crash in between leaves only unreferenced blobs and temp
files, which `gc` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from registry import audit as audit_log
from registry import jobs
from registry.blobs import BlobStore, Progress, Staged, hash_file
from registry.db import ensure_schema, is_sqlite, make_engine
from registry.errors import IntegrityError, RegistryError
from registry.folders import adapter_files, compare_base, hash_base, inspect_adapter
from registry.info import ArtifactInfo, GcReport, VerifyReport, VersionInfo, utc
from registry.models import (
    Alias,
    Artifact,
    ArtifactInput,
    AuditEvent,
    Blob,
    Name,
    Version,
    VersionFile,
    VersionMeta,
)
from registry.names import Ref, check_alias, check_name, parse_ref

ARTIFACT_KINDS = ("safetensors", "onnx", "onnx_slots", "onnx_adapter")
BUILTIN_WHERE = {"kind": Version.kind, "author": Version.author, "base_revision": Version.base_revision,
                 "r": Version.r, "mora_type": Version.mora_type}
MAX_META = 64


def _crash_point(point: str) -> None:
    """Fault injection for the crash-safety tests: ADAPTERS_CRASH_AT=<point> SIGKILLs here."""
    if os.environ.get("ADAPTERS_CRASH_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def manifest_digest(files: dict[str, str]) -> str:
    """A version's digest: sha256 over its {path: blob digest} map (content only, no metadata)."""
    body = audit_log.canonical({"files": files})
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def parse_meta(meta: dict[str, str] | Iterable[str] | None) -> dict[str, str]:
    """`{"k": "v"}` or `["k=v", ...]` -> validated dict."""
    if meta is None:
        return {}
    items = meta.items() if isinstance(meta, dict) else (_split_kv(m, "--meta") for m in meta)
    out = {}
    for k, v in items:
        k, v = str(k), str(v)
        if not k or len(k) > 100 or not k.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise RegistryError(f"metadata key {k!r}: use letters, digits and -_. (at most 100)")
        if len(v) > 500:
            raise RegistryError(f"metadata {k}: value longer than 500 characters")
        out[k] = v
    if len(out) > MAX_META:
        raise RegistryError(f"at most {MAX_META} metadata entries")
    return out


def _split_kv(item: str, what: str) -> tuple[str, str]:
    if "=" not in item:
        raise RegistryError(f"{what} {item!r}: expected KEY=VALUE")
    k, _, v = item.partition("=")
    return k.strip(), v


def resolve_home(home: str | Path | None = None) -> Path:
    """The home directory: `home`, else $ADAPTERS_HOME, else the user data dir (created)."""
    if home is None:
        home = os.environ.get("ADAPTERS_HOME")
    if not home:
        import platformdirs

        home = platformdirs.user_data_dir("adapters", appauthor=False)
    home = Path(home).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(f"{home}: cannot create the registry home ({exc.strerror})") from None
    return home


def resolve_url(home: Path, db_url: str | None = None) -> str:
    """The database URL: `db_url`, else $ADAPTERS_DB_URL, else SQLite in the home."""
    return db_url or os.environ.get("ADAPTERS_DB_URL") or f"sqlite:///{home / 'registry.db'}"


class Registry:
    """A handle on one store (database + blob directory). Not shared between threads."""

    def __init__(self, home: Path, url: str):
        self.home = home
        self.url = url
        self.engine = make_engine(url)
        self.blobs = BlobStore(home / "blobs")
        self._read = sessionmaker(self.engine)
        self._write = sessionmaker(self.engine.execution_options(write=True))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, home: str | Path | None = None, db_url: str | None = None) -> Registry:
        """Open (creating if needed) a store. See the module docstring for the env vars.

        home: arg, else ADAPTERS_HOME, else the user data dir. db_url: arg, else
        ADAPTERS_DB_URL, else `<home>/registry.db` (SQLite). The SQLite schema upgrades itself;
        an empty PostgreSQL database is initialised; an older one needs `adapters db upgrade`.
        """
        home = resolve_home(home)
        url = resolve_url(home, db_url)
        reg = cls(home, url)
        ensure_schema(reg.engine, auto=is_sqlite(url), lock_path=home / ".schema.lock")
        return reg

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction that holds the global writer lock from its first statement."""
        with self._write() as s, s.begin():
            audit_log.lock_state(s)
            yield s

    # ------------------------------------------------------------------ push
    def push(self, folder: str | Path, name: str, *, base_model: str | None = None,
             base_revision: str | None = None, base_dir: str | Path | None = None,
             parent: str | None = None, tags: Sequence[str] = (), meta: dict[str, str] | Iterable[str] | None = None,
             message: str | None = None, progress: Progress | None = None) -> VersionInfo:
        """Store an adapter folder as the next version of `name` (or answer the identical one).

        Validates the folder with mora_core (bad input raises RegistryError, store unchanged),
        copies each file into the blob store while hashing it, then records the version,
        its tags and an audit event in one transaction. Without `base_model`, a version with
        a `parent` records the parent's base model, revision and base digests.
        """
        check_name(name)
        tags = [check_alias(t) for t in tags]
        meta_d = parse_meta(meta)
        folder = Path(folder)
        files = adapter_files(folder)
        parent_info = self.resolve(parent) if parent else None
        parent_id = parent_info.id if parent_info else None
        base_files = hash_base(base_dir) if base_dir is not None else None
        if parent_info is not None and base_model is None:  # derived on the parent's base
            base_model, base_revision = parent_info.base_model, base_revision or parent_info.base_revision
            if base_files is None:
                base_files = parent_info.base_files
        staged: list[Staged] = []
        try:
            largest = max(files, key=lambda f: f.stat().st_size)
            with ThreadPoolExecutor(1) as pool:
                # New content: validation (torch; GIL released in its reads and kernels) overlaps
                # the copy. Content the store probably holds (a blob of the same size exists) is
                # hashed first; if it is an existing version's content, its recorded spec is reused
                # and a re-push costs one hashing pass.
                spec_future = None if self._has_size(largest.stat().st_size) else pool.submit(inspect_adapter, folder)
                try:
                    for f in files:
                        staged.append(self._stage(f, progress))
                        if spec_future is not None and spec_future.done() and spec_future.exception():
                            break
                finally:
                    spec = spec_future.result() if spec_future is not None else None
                digests = {st.source.name: st.digest for st in staged}
                digest = manifest_digest(digests)
                if spec is None:
                    spec = self._known_spec(digest)
                if spec is None:
                    spec = inspect_adapter(folder)
            _crash_point("staged")
            for st in staged:
                self.blobs.make_durable(st)
            _crash_point("durable")
            with self._writing() as s:
                nm = s.scalar(select(Name).where(Name.name == name))
                existing = None
                if nm is not None:
                    existing = s.scalar(select(Version).where(Version.name_id == nm.id, Version.digest == digest))
                if existing is not None:
                    for st in staged:
                        self.blobs.discard(st)
                    audit_log.append(s, "push", f"{name}:{existing.number}",
                                     {"digest": digest, "unchanged": True}, name=name)
                    for t in tags:
                        self._move_alias(s, nm, t, existing)
                    s.flush()
                    return self._info(s, existing, full=False)
                for st in staged:
                    if st.tmp is None and not self.blobs.exists(st.digest):
                        raise RegistryError(f"{st.source}: its blob vanished during the push (gc?); push again")
                    self.blobs.publish(st)
                    if s.get(Blob, st.digest) is None:
                        s.add(Blob(digest=st.digest, size=st.size, created=_now()))
                _crash_point("published")
                if nm is None:
                    nm = Name(name=name, latest=0, created=_now())
                    s.add(nm)
                    s.flush()
                number = nm.latest + 1
                nm.latest = number
                v = Version(name_id=nm.id, number=number, digest=digest, kind=spec["kind"],
                            r=spec.get("r"), mora_type=spec.get("mora_type"),
                            spec=audit_log.canonical(spec), base_model=base_model, base_revision=base_revision,
                            base_files=audit_log.canonical(base_files) if base_files is not None else None,
                            parent_id=parent_id, meta=audit_log.canonical(meta_d), author=audit_log.actor(),
                            message=message, created=_now(), size=sum(st.size for st in staged))
                s.add(v)
                s.flush()
                for st in staged:
                    s.add(VersionFile(version_id=v.id, path=st.source.name, blob=st.digest, size=st.size))
                for k, val in meta_d.items():
                    s.add(VersionMeta(version_id=v.id, key=k, value=val))
                audit_log.append(s, "push", f"{name}:{number}",
                                 {"digest": digest, "files": digests, "kind": spec["kind"],
                                  "base_model": base_model, "parent": parent}, name=name)
                for t in tags:
                    self._move_alias(s, nm, t, v)
                s.flush()
                _crash_point("before_commit")
                info = self._info(s, v, full=False)
            return info
        finally:
            for st in staged:
                self.blobs.discard(st)

    def _has_size(self, size: int) -> bool:
        with self._read() as s:
            return s.scalar(select(Blob.digest).where(Blob.size == size).limit(1)) is not None

    def _known_spec(self, digest: str) -> dict[str, Any] | None:
        """The recorded spec of any version with exactly this content (validated when pushed)."""
        with self._read() as s:
            text = s.scalar(select(Version.spec).where(Version.digest == digest).limit(1))
        return json.loads(text) if text else None

    def _stage(self, path: Path, progress: Progress | None) -> Staged:
        """Copy+hash a file; hash only when a blob of the same size exists (a likely re-push)."""
        if self._has_size(path.stat().st_size):
            st = self.blobs.stage_hash_only(path, progress)
            if self.blobs.exists(st.digest):
                return st
        return self.blobs.stage(path, progress)

    # ------------------------------------------------------------------ resolving
    def _name(self, s: Session, name: str) -> Name:
        nm = s.scalar(select(Name).where(Name.name == name))
        if nm is None:
            raise RegistryError(f"unknown adapter {name!r}")
        return nm

    def _row(self, s: Session, ref: str | Ref) -> Version:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        text = ref if isinstance(ref, str) else r.name
        if r.is_artifact:
            raise RegistryError(f"reference {text!r} names an artifact, not an adapter version")
        nm = self._name(s, r.name)
        if r.number is not None:
            v = s.scalar(select(Version).where(Version.name_id == nm.id, Version.number == r.number))
            if v is None:
                raise RegistryError(f"unknown version {text!r} (latest is {r.name}:{nm.latest})")
            return v
        if r.alias is not None:
            a = s.get(Alias, (nm.id, r.alias))
            if a is None:
                raise RegistryError(f"unknown alias {text!r}")
            return s.get(Version, a.version_id)
        if r.digest_prefix is not None:
            return _one_by_digest(
                s, select(Version).where(Version.name_id == nm.id), Version.digest, r.digest_prefix,
                missing=f"no version of {r.name!r} has digest sha256:{r.digest_prefix}...",
                ambiguous=lambda a, b: f"reference {text!r} is ambiguous ({a.number}, {b.number}, ...): "
                                       "give more digits")
        v = s.scalar(select(Version).where(Version.name_id == nm.id).order_by(Version.number.desc()).limit(1))
        if v is None:
            raise RegistryError(f"adapter {r.name!r} has no versions")
        return v

    def resolve(self, ref: str) -> VersionInfo:
        """The version a reference names; RegistryError for unknown or ambiguous references."""
        with self._read() as s:
            return self._info(s, self._row(s, ref), full=True)

    def _info(self, s: Session, v: Version, full: bool) -> VersionInfo:
        name = s.scalar(select(Name.name).where(Name.id == v.name_id))
        aliases = sorted(s.scalars(select(Alias.alias).where(Alias.version_id == v.id)))
        parent = None
        if v.parent_id is not None:
            p = s.get(Version, v.parent_id)
            parent = f"{s.scalar(select(Name.name).where(Name.id == p.name_id))}:{p.number}"
        info = VersionInfo(name=name, number=v.number, digest=v.digest, created=utc(v.created), kind=v.kind,
                           size=v.size, author=v.author, r=v.r, mora_type=v.mora_type, base_model=v.base_model,
                           base_revision=v.base_revision, message=v.message, meta=json.loads(v.meta),
                           aliases=aliases, parent=parent, id=v.id)
        info.base_files = json.loads(v.base_files) if v.base_files else None
        if full:
            info.spec = json.loads(v.spec)
            info.files = [{"path": f.path, "digest": f.blob, "size": f.size}
                          for f in s.scalars(select(VersionFile).where(VersionFile.version_id == v.id)
                                             .order_by(VersionFile.path))]
        return info

    # ------------------------------------------------------------------ listing
    def list(self, name: str | None = None, *, base_model: str | None = None,
             where: dict[str, str] | Iterable[str] | None = None, limit: int = 50,
             offset: int = 0) -> list[VersionInfo]:
        """Versions, newest first (one indexed, paginated query plus one for the page's aliases)."""
        if limit < 0 or offset < 0:
            raise RegistryError("--limit and offset must not be negative")
        items = (where.items() if isinstance(where, dict)
                 else [_split_kv(w, "--where") for w in (where or ())])
        cols = (Version.id, Version.number, Version.digest, Version.created, Version.kind, Version.size,
                Version.author, Version.r, Version.mora_type, Version.base_model, Version.base_revision,
                Version.message, Version.meta, Version.parent_id, Name.name)
        stmt = select(*cols).join(Name, Name.id == Version.name_id)
        with self._read() as s:
            if name is not None:
                nm = self._name(s, check_name(name))
                stmt = stmt.where(Version.name_id == nm.id).order_by(Version.number.desc())
            else:
                stmt = stmt.order_by(Version.id.desc())
            if base_model is not None:
                stmt = stmt.where(Version.base_model == base_model)
            for k, val in items:
                if k in BUILTIN_WHERE:
                    col = BUILTIN_WHERE[k]
                    if k in ("r", "mora_type"):
                        if not val.isdigit():
                            raise RegistryError(f"--where {k}={val}: {k} is a number")
                        val = int(val)
                    stmt = stmt.where(col == val)
                else:
                    stmt = stmt.where(Version.id.in_(select(VersionMeta.version_id)
                                                     .where(VersionMeta.key == k, VersionMeta.value == val)))
            if limit:
                stmt = stmt.limit(limit)
            if offset:
                stmt = stmt.offset(offset)
            rows = s.execute(stmt).all()
            ids = [r.id for r in rows]
            aliases: dict[int, list[str]] = {}
            parents: dict[int, str] = {}
            if ids:
                for vid, alias in s.execute(select(Alias.version_id, Alias.alias)
                                            .where(Alias.version_id.in_(ids)).order_by(Alias.alias)):
                    aliases.setdefault(vid, []).append(alias)
                pids = {r.parent_id for r in rows if r.parent_id is not None}
                if pids:
                    for pid, num, pname in s.execute(select(Version.id, Version.number, Name.name)
                                                     .join(Name, Name.id == Version.name_id)
                                                     .where(Version.id.in_(pids))):
                        parents[pid] = f"{pname}:{num}"
        return [VersionInfo(name=r.name, number=r.number, digest=r.digest, created=utc(r.created), kind=r.kind,
                            size=r.size, author=r.author, r=r.r, mora_type=r.mora_type, base_model=r.base_model,
                            base_revision=r.base_revision, message=r.message, meta=json.loads(r.meta),
                            aliases=aliases.get(r.id, []), parent=parents.get(r.parent_id), id=r.id)
                for r in rows]

    def show(self, ref: str) -> VersionInfo | ArtifactInfo:
        """Everything recorded about a version or an artifact."""
        if parse_ref(ref).is_artifact:
            return self.artifact(ref)
        return self.resolve(ref)

    # ------------------------------------------------------------------ aliases
    def _move_alias(self, s: Session, nm: Name, alias: str, v: Version) -> None:
        a = s.get(Alias, (nm.id, alias))
        old = None
        if a is None:
            s.add(Alias(name_id=nm.id, alias=alias, version_id=v.id, updated=_now()))
        else:
            if a.version_id == v.id:
                return
            old = s.get(Version, a.version_id).number
            a.version_id = v.id
            a.updated = _now()
        audit_log.append(s, "tag", f"{nm.name}@{alias}",
                         {"alias": alias, "from": f"{nm.name}:{old}" if old else None,
                          "to": f"{nm.name}:{v.number}"}, name=nm.name)

    def tag(self, ref: str, alias: str) -> VersionInfo:
        """Point `name@alias` at the version `ref` names (moving it if it exists; audited)."""
        check_alias(alias)
        with self._writing() as s:
            v = self._row(s, ref)
            nm = s.get(Name, v.name_id)
            self._move_alias(s, nm, alias, v)
            s.flush()
            return self._info(s, v, full=False)

    def untag(self, name: str, alias: str) -> str:
        """Remove an alias; returns the ref it pointed at (audited)."""
        check_name(name)
        with self._writing() as s:
            nm = self._name(s, name)
            a = s.get(Alias, (nm.id, alias))
            if a is None:
                raise RegistryError(f"unknown alias {name}@{alias}")
            was = f"{name}:{s.get(Version, a.version_id).number}"
            s.delete(a)
            audit_log.append(s, "untag", f"{name}@{alias}", {"alias": alias, "from": was}, name=name)
        return was

    def delete(self, ref: str) -> str:
        """Delete a version no other version or artifact derives from (audited; blobs go at gc)."""
        with self._writing() as s:
            v = self._row(s, ref)
            nm = s.get(Name, v.name_id)
            label = f"{nm.name}:{v.number}"
            if s.scalar(select(Version.id).where(Version.parent_id == v.id).limit(1)) is not None:
                raise RegistryError(f"{label}: other versions derive from it (--parent); delete them first")
            if s.scalar(select(ArtifactInput.artifact_id).where(ArtifactInput.version_id == v.id).limit(1)):
                raise RegistryError(f"{label}: merged artifacts were built from it; it stays for their lineage")
            s.execute(delete(Alias).where(Alias.version_id == v.id))
            s.execute(delete(VersionMeta).where(VersionMeta.version_id == v.id))
            s.execute(delete(VersionFile).where(VersionFile.version_id == v.id))
            s.delete(v)
            audit_log.append(s, "delete", label, {"digest": v.digest}, name=nm.name)
        return label

    # ------------------------------------------------------------------ reading bytes
    def pull(self, ref: str, out: str | Path | None = None, progress: Progress | None = None) -> Path:
        """Write the version's PEFT folder to `out` (default ./<name>-<N>), verifying every digest.

        The folder appears atomically (written beside it, then renamed); audited.
        """
        info = self.resolve(ref)
        dest = Path(out) if out is not None else Path.cwd() / f"{info.name.replace('/', '_')}-{info.number}"
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"{dest}: already exists and is not an empty folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._write_folder(info, dest, progress)
        self.audit("pull", info.ref, {"digest": info.digest, "to": str(dest.resolve())}, name=info.name)
        return dest

    def _write_folder(self, info: VersionInfo, dest: Path, progress: Progress | None = None) -> None:
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for f in info.files or []:
                self.blobs.copy_verified(f["digest"], tmp / f["path"], progress)
            from registry.blobs import fsync_dir

            fsync_dir(tmp)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def materialize(self, ref: str) -> Path:
        """A verified PEFT folder for `ref`, cached under the home and re-verified on each call."""
        info = self.resolve(ref)
        cache = self.home / "cache" / info.digest[7:]
        if cache.is_dir():
            if all((cache / f["path"]).is_file() and hash_file(cache / f["path"])[0] == f["digest"]
                   for f in info.files or []):
                return cache
            shutil.rmtree(cache, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write_folder(info, cache)
        except OSError:
            if not cache.is_dir():  # another process won the rename race: fine if it is there
                raise
        return cache

    def check_base(self, ref: str, base_dir: str | Path) -> list[str]:
        """Differences between the base weights recorded at push and those in `base_dir`."""
        info = self.resolve(ref)
        if not info.base_files:
            return []
        return compare_base(info.base_files, hash_base(base_dir))

    # ------------------------------------------------------------------ artifacts
    def register_artifact(self, *, kind: str, path: Path, files: dict[str, str] | None = None,
                          recipe: dict, inputs: list[tuple[str, float]],
                          report: dict | None = None) -> ArtifactInfo:
        """Record a merged output in place (not copied), with lineage edges from its inputs."""
        if kind not in ARTIFACT_KINDS:
            raise RegistryError(f"artifact kind {kind!r}: expected one of {', '.join(ARTIFACT_KINDS)}")
        path = Path(path).resolve()
        if files is None:
            if path.is_dir():
                files = {p.relative_to(path).as_posix(): hash_file(p)[0]
                         for p in sorted(path.rglob("*")) if p.is_file()}
            elif path.is_file():
                files = {path.name: hash_file(path)[0]}
            else:
                raise RegistryError(f"{path}: artifact not found")
        files = dict(sorted(files.items()))
        digest = "sha256:" + hashlib.sha256(audit_log.canonical({"kind": kind, "files": files}).encode()).hexdigest()
        recipe_text = audit_log.canonical(recipe)
        report_text = audit_log.canonical(report) if report is not None else None
        with self._writing() as s:
            weights: dict[int, float] = {}
            labels: dict[int, str] = {}
            for ref, w in inputs:
                v = self._row(s, ref)
                weights[v.id] = weights.get(v.id, 0.0) + float(w)
                labels[v.id] = f"{s.get(Name, v.name_id).name}:{v.number}"
            a = Artifact(digest=digest, kind=kind, path=str(path), files=audit_log.canonical(files),
                         recipe=recipe_text, report=report_text, author=audit_log.actor(), created=_now())
            s.add(a)
            s.flush()
            for vid, w in weights.items():
                s.add(ArtifactInput(artifact_id=a.id, version_id=vid, weight=w))
            audit_log.append(s, "register", f"artifact:{a.id}",
                             {"kind": kind, "path": str(path), "digest": digest,
                              "inputs": [[labels[v], w] for v, w in weights.items()]})
            s.flush()
            return self._artifact_info(s, a)

    def _artifact_info(self, s: Session, a: Artifact) -> ArtifactInfo:
        inputs = [(f"{n}:{num}", w) for n, num, w in s.execute(
            select(Name.name, Version.number, ArtifactInput.weight)
            .join(Version, Version.id == ArtifactInput.version_id).join(Name, Name.id == Version.name_id)
            .where(ArtifactInput.artifact_id == a.id).order_by(Name.name, Version.number))]
        return ArtifactInfo(id=a.id, digest=a.digest, kind=a.kind, path=a.path, files=json.loads(a.files),
                            recipe=json.loads(a.recipe), report=json.loads(a.report) if a.report else None,
                            inputs=inputs, author=a.author, created=utc(a.created))

    def _artifact_row(self, s: Session, ref: str) -> Artifact:
        r = parse_ref(ref)
        if not r.is_artifact:
            raise RegistryError(f"reference {ref!r} is not an artifact reference")
        if r.artifact_id is not None:
            a = s.get(Artifact, r.artifact_id)
            if a is None:
                raise RegistryError(f"unknown artifact {ref!r}")
            return a
        return _one_by_digest(
            s, select(Artifact), Artifact.digest, r.digest_prefix, missing=f"unknown artifact {ref!r}",
            ambiguous=lambda a, b: f"reference {ref!r} is ambiguous (artifact:{a.id}, artifact:{b.id}): "
                                   "give more digits")

    def artifact(self, ref: str) -> ArtifactInfo:
        with self._read() as s:
            return self._artifact_info(s, self._artifact_row(s, ref))

    def file_digests(self, paths: Sequence[Path]) -> dict[str, str]:
        """{file name: `sha256:<hex>`} of regular files (one read each)."""
        return {Path(p).name: hash_file(Path(p))[0] for p in paths}

    # ------------------------------------------------------------------ last verify (for the web view)
    def record_verify(self, report: dict[str, Any]) -> dict[str, Any]:
        """Keep `report` (a VerifyReport dict) as this home's last verify result, stamped; returns it."""
        from registry.audit import now_iso

        record = {**report, "finished": now_iso()}
        path = self.home / "last-verify.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        return record

    def last_verify(self) -> dict[str, Any] | None:
        """The last report `record_verify` kept, or None when verify never ran from this home."""
        path = self.home / "last-verify.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def complete_refs(self, prefix: str, limit: int = 50) -> list[str]:
        """References starting with `prefix`, for shell completion: names, `name:N`, `name@alias`."""
        with self._read() as s:
            if "@" in prefix:
                name, _, start = prefix.partition("@")
                rows = s.scalars(select(Alias.alias).join(Name, Name.id == Alias.name_id)
                                 .where(Name.name == name, Alias.alias.startswith(start, autoescape=True))
                                 .order_by(Alias.alias).limit(limit))
                return [f"{name}@{a}" for a in rows]
            if ":" in prefix and not prefix.startswith("artifact"):
                name, _, start = prefix.rpartition(":")
                rows = s.scalars(select(Version.number).join(Name, Name.id == Version.name_id)
                                 .where(Name.name == name).order_by(Version.number.desc()))
                return [f"{name}:{n}" for n in rows if str(n).startswith(start)][:limit]
            names = list(s.scalars(select(Name.name).where(Name.name.startswith(prefix, autoescape=True))
                                   .order_by(Name.name).limit(limit)))
        return names + (["artifact:"] if "artifact".startswith(prefix) and prefix else [])

    def check_artifact(self, ref: str) -> list[str]:
        """Problems of one artifact's files (missing, altered); [] when every file matches its record."""
        info = self.artifact(ref)
        root = Path(info.path)
        problems = []
        for rel, digest in info.files.items():
            p = root if root.is_file() else root / rel
            if not p.is_file():
                problems.append(f"{info.ref}: {p} is missing")
            elif hash_file(p)[0] != digest:
                problems.append(f"{info.ref}: {p} is altered (digest differs from the record)")
        return problems

    # ------------------------------------------------------------------ batch jobs
    def claim_job(self, key: str, output: str, owner: str, *, reuse_done: bool = True) -> jobs.Claim:
        """Lease job `key` for `owner`, or say it is cached / run by a live owner (see registry.jobs)."""
        with self._writing() as s:
            return jobs.claim(s, key, output, owner, reuse_done=reuse_done)

    def renew_jobs(self, keys: Sequence[str], owner: str) -> None:
        with self._writing() as s:
            jobs.renew(s, list(keys), owner)

    def finish_job(self, key: str, owner: str, artifact_ref: str | None, error: str | None = None) -> None:
        """Record a job's result: the artifact it registered, or its error."""
        with self._writing() as s:
            artifact_id = self._artifact_row(s, artifact_ref).id if artifact_ref else None
            jobs.finish(s, key, owner, artifact_id, error)

    def release_job(self, key: str, owner: str) -> None:
        with self._writing() as s:
            jobs.release(s, key, owner)

    def batch_output(self, output: str) -> str | None:
        """The artifact ref of the batch job that last wrote `output`, if any."""
        with self._read() as s:
            row = jobs.wrote_output(s, output)
            return f"artifact:{row.artifact_id}" if row is not None and row.artifact_id else None

    # ------------------------------------------------------------------ lineage
    def lineage(self, ref: str, max_depth: int = 1000) -> dict[str, Any]:
        """Ancestors (parents, base model) and descendants (child versions, artifacts) of `ref`.

        Returns {"root": ref, "nodes": [{id, type, ...}], "edges": [{from, to, kind, weight?}]}.
        """
        nodes: dict[str, dict[str, Any]] = {}
        edges: list[dict[str, Any]] = []
        with self._read() as s:
            names: dict[int, str] = {}

            def label(v: Version) -> str:
                if v.name_id not in names:
                    names[v.name_id] = s.get(Name, v.name_id).name
                key = f"{names[v.name_id]}:{v.number}"
                if key not in nodes:
                    nodes[key] = {"id": key, "type": "version", "kind": v.kind, "digest": v.digest,
                                  "base_model": v.base_model, "base_revision": v.base_revision}
                return key

            def base_node(v: Version) -> str | None:
                if not v.base_model:
                    return None
                key = f"base:{v.base_model}" + (f"@{v.base_revision}" if v.base_revision else "")
                nodes.setdefault(key, {"id": key, "type": "base", "model": v.base_model,
                                       "revision": v.base_revision})
                return key

            root = self._row(s, ref)
            root_key = label(root)
            nodes[root_key]["role"] = "root"
            # ancestors
            cur, depth = root, 0
            while cur is not None and depth < max_depth:
                b = base_node(cur)
                if b:
                    edges.append({"from": b, "to": label(cur), "kind": "base"})
                if cur.parent_id is None:
                    break
                par = s.get(Version, cur.parent_id)
                edges.append({"from": label(par), "to": label(cur), "kind": "parent"})
                nodes[label(par)].setdefault("role", "ancestor")
                cur, depth = par, depth + 1
            # descendants
            frontier, seen, depth = [root], {root.id}, 0
            while frontier and depth < max_depth:
                ids = [v.id for v in frontier]
                for vid, aid, w in s.execute(select(ArtifactInput.version_id, ArtifactInput.artifact_id,
                                                    ArtifactInput.weight).where(ArtifactInput.version_id.in_(ids))):
                    a = s.get(Artifact, aid)
                    key = f"artifact:{aid}"
                    nodes.setdefault(key, {"id": key, "type": "artifact", "kind": a.kind, "path": a.path,
                                           "digest": a.digest, "role": "descendant"})
                    src = next(v for v in frontier if v.id == vid)
                    edges.append({"from": label(src), "to": key, "kind": "input", "weight": w})
                children = s.scalars(select(Version).where(Version.parent_id.in_(ids)).order_by(Version.id)).all()
                nxt = []
                for c in children:
                    if c.id in seen:
                        continue
                    seen.add(c.id)
                    src = next(v for v in frontier if v.id == c.parent_id)
                    edges.append({"from": label(src), "to": label(c), "kind": "parent"})
                    nodes[label(c)].setdefault("role", "descendant")
                    nxt.append(c)
                frontier, depth = nxt, depth + 1
        return {"root": root_key, "nodes": list(nodes.values()), "edges": edges}

    # ------------------------------------------------------------------ audit
    def audit(self, action: str, subject: str, details: dict, *, name: str | None = None) -> dict[str, Any]:
        """Append an event to the audit chain (for other components: merge, export...)."""
        if not action or len(action) > 32:
            raise RegistryError(f"audit action {action!r}: 1 to 32 characters")
        with self._writing() as s:
            ev = audit_log.append(s, action, subject, details, name=name)
            s.flush()
            return audit_log.event_dict(ev)

    def events(self, ref: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit events, oldest first; for a name all its events, for `name:N`/alias that version's."""
        stmt = select(AuditEvent)
        with self._read() as s:
            if ref is not None:
                r = parse_ref(ref)
                if r.is_artifact:
                    stmt = stmt.where(AuditEvent.subject == f"artifact:{self._artifact_row(s, ref).id}")
                elif r.number is None and r.alias is None and r.digest_prefix is None:
                    stmt = stmt.where(AuditEvent.name == r.name)
                else:
                    v = self._row(s, r)
                    label = f"{r.name}:{v.number}"
                    quoted = json.dumps(label).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    stmt = stmt.where(AuditEvent.name == r.name,
                                      or_(AuditEvent.subject == label,
                                          AuditEvent.details.like(f"%{quoted}%", escape="\\")))
            if limit:
                stmt = stmt.order_by(AuditEvent.seq.desc()).limit(limit)
                return [audit_log.event_dict(e) for e in reversed(s.scalars(stmt).all())]
            return [audit_log.event_dict(e) for e in s.scalars(stmt.order_by(AuditEvent.seq))]

    # ------------------------------------------------------------------ verify / gc
    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Re-hash every blob and artifact file, walk the audit chain. `report.ok` is False on damage."""
        rep = VerifyReport()
        with self._read() as s:
            blobs = s.execute(select(Blob.digest, Blob.size).order_by(Blob.digest)).all()
            referenced = set(s.scalars(select(VersionFile.blob).distinct()))
            for digest, size in blobs:
                problem = self.blobs.check(digest, progress)
                rep.blobs += 1
                rep.bytes += size
                if problem and digest in referenced:
                    users = [f"{n}:{num}" for n, num in s.execute(
                        select(Name.name, Version.number).join(Version, Version.name_id == Name.id)
                        .join(VersionFile, VersionFile.version_id == Version.id)
                        .where(VersionFile.blob == digest).limit(5))]
                    rep.problems.append(f"{problem} (used by {', '.join(users)})")
                elif problem:
                    rep.warnings.append(f"{problem} (unreferenced; gc forgets it)")
            for digest in sorted(referenced - {d for d, _ in blobs}):
                rep.problems.append(f"blob {digest} is referenced but not recorded")
            for a in s.scalars(select(Artifact).order_by(Artifact.id)):
                rep.artifacts += 1
                root = Path(a.path)
                if not root.exists():
                    rep.warnings.append(f"artifact:{a.id}: {a.path} is missing (moved or deleted)")
                    continue
                for rel, digest in json.loads(a.files).items():
                    p = root if root.is_file() else root / rel
                    if not p.is_file():
                        rep.warnings.append(f"artifact:{a.id}: {p} is missing")
                    elif hash_file(p)[0] != digest:
                        rep.problems.append(f"artifact:{a.id}: {p} is altered (digest differs from the record)")
            rep.events = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
            rep.problems.extend(audit_log.verify_chain(s))
        return rep

    def gc(self, dry_run: bool = False) -> GcReport:
        """Remove blobs no version references and leftovers of interrupted writes (audited)."""
        rep = GcReport(dry_run=dry_run)
        ctx = self._read() if dry_run else self._writing()
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(ctx)
            referenced = set(s.scalars(select(VersionFile.blob).distinct()))
            for digest, size in list(self.blobs.iter_digests()):
                if digest not in referenced:
                    rep.blobs.append(digest)
                    rep.bytes_freed += size
                    if not dry_run:
                        self.blobs.remove(digest)
            for digest in s.scalars(select(Blob.digest)).all():
                if digest not in referenced and not dry_run:
                    s.execute(delete(Blob).where(Blob.digest == digest))
            for tmp, size in list(self.blobs.leftovers()):
                rep.leftovers.append(str(tmp))
                rep.bytes_freed += size
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            rep.bytes_freed += self._cache_leftovers(rep, dry_run)
            if not dry_run:
                audit_log.append(s, "gc", "store", {"blobs_removed": len(rep.blobs),
                                                    "leftovers_removed": len(rep.leftovers),
                                                    "bytes_freed": rep.bytes_freed})
        return rep

    def _cache_leftovers(self, rep: GcReport, dry_run: bool) -> int:
        """Half-written materialize folders whose process is gone."""
        freed = 0
        cache = self.home / "cache"
        if not cache.is_dir():
            return 0
        for d in cache.glob(".*.tmp-*"):
            try:
                pid = int(d.name.split(".tmp-")[1].split("-")[0])
            except (IndexError, ValueError):
                continue
            if _alive(pid):
                continue
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            rep.leftovers.append(str(d))
            freed += size
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
        return freed


def _one_by_digest(s: Session, query: Any, column: Any, prefix: str, *, missing: str,
                   ambiguous: Callable[[Any, Any], str]) -> Any:
    """The single row of `query` whose `column` starts with `sha256:<prefix>`, or a one-line error."""
    rows = s.scalars(query.where(column.startswith("sha256:" + prefix)).limit(2)).all()
    if not rows:
        raise RegistryError(missing)
    if len(rows) > 1:
        raise RegistryError(ambiguous(rows[0], rows[1]))
    return rows[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["ArtifactInfo", "GcReport", "IntegrityError", "Registry", "RegistryError", "VerifyReport",
           "VersionInfo"]
