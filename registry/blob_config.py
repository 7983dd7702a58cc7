"""Which blob backend a store uses, recorded in its database so that every machine agrees.

- No URL anywhere: the local directory `<home>/blobs` (the default; nothing recorded).
- `ADAPTERS_BLOB_URL` / `--blob-url s3://bucket/prefix` on a store with no recorded URL:
  the bucket is checked (reachable, credentials, empty of foreign keys, or already this
  store's), marked with the store id, and the URL recorded (the `settings` table,
  audited as `configure`). Only a store holding no blobs yet can be bound: blobs already
  in some home's directory would become unreachable.
- A recorded URL is used by every machine that opens the database, with or without the
  variable; a different URL given explicitly is an error (one line), never a silent switch.

Reading the recorded URL is one small query; boto3 is imported only when the S3
backend is actually used (listing versions never is).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.blob_backend import BlobBackend, normalize_blob_url
from registry.errors import RegistryError
from registry.models import Blob, Setting

BLOB_URL = "blob_url"
STORE_ID = "store_id"


def given_blob_url(arg: str | None) -> str | None:
    """The URL asked for: the argument, else $ADAPTERS_BLOB_URL (normalised), else None."""
    url = arg if arg else os.environ.get("ADAPTERS_BLOB_URL") or None
    return normalize_blob_url(url) if url else None


def recorded(s: Session, key: str) -> str | None:
    return s.scalar(select(Setting.value).where(Setting.key == key))


def check_agreement(recorded_url: str | None, given: str | None) -> None:
    """A URL given explicitly must be the recorded one (one-line error otherwise)."""
    if recorded_url and given and given != recorded_url:
        raise RegistryError(f"blob URL {given} differs from {recorded_url} recorded in the database "
                            "(every machine of a store uses the same blobs); unset ADAPTERS_BLOB_URL "
                            "or give the recorded one")


def local_backend(home: Path) -> BlobBackend:
    from registry.blobs import BlobStore

    return BlobStore(home / "blobs")


def s3_backend(url: str, home: Path) -> BlobBackend:
    from registry.blob_cache import BlobCache
    from registry.blob_s3 import S3BlobStore

    return S3BlobStore(url, BlobCache(home / "blob-cache"))


def open_backend(home: Path, given: str | None, read: Session, writing) -> BlobBackend:
    """The store's backend; binds `given` to an unbound store (see the module docstring).

    `read` is a read session; `writing()` a context manager giving a write transaction
    holding the writer lock (the registry's), used only to record a new binding.
    """
    url = recorded(read, BLOB_URL)
    check_agreement(url, given)
    if url:
        return s3_backend(url, home)
    if not given:
        return local_backend(home)
    backend = s3_backend(given, home)
    from registry import audit as audit_log

    with writing() as s:
        url = recorded(s, BLOB_URL)
        check_agreement(url, given)
        if url:
            return backend
        blobs = s.scalar(select(func.count()).select_from(Blob)) or 0
        if blobs:
            raise RegistryError(f"blob URL {given}: this store already holds {blobs} blobs in a home "
                                "directory; a blob URL can only be set on a store without blobs")
        store_id = recorded(s, STORE_ID) or secrets.token_hex(16)
        backend.claim(store_id)  # reachable, credentials, no foreign keys; marks the prefix
        if recorded(s, STORE_ID) is None:
            s.add(Setting(key=STORE_ID, value=store_id))
        s.add(Setting(key=BLOB_URL, value=given))
        audit_log.append(s, "configure", "store", {BLOB_URL: given, STORE_ID: store_id})
    return backend
