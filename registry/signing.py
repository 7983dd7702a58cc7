"""Optional signing of the audit chain head with a secret key (HMAC-SHA256).

Without a key, the chain is tamper-evident only against partial edits: whoever can write
the database can rewrite rows and events and recompute every hash after them. With
`ADAPTERS_AUDIT_KEY` set (a secret shared by the legitimate writers, never stored in the
database), every append also stores

    audit_mac = HMAC-SHA256(key, "adapters-audit-head:<seq>:<head hash>")

in the `registry_state` row. The head hash covers every event before it (and the events
cover the rows, see `registry.records`), so one MAC seals the whole history: rewriting it,
cutting events off its end, or appending without the key leaves a head whose MAC does not
check. What a key cannot catch: a whole earlier copy of the database put back (its head and
MAC were valid once); keep a copy of `adapters audit --limit 1` elsewhere to catch that.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from registry.errors import RegistryError

KEY_ENV = "ADAPTERS_AUDIT_KEY"
MIN_KEY_CHARS = 16


def audit_key() -> bytes | None:
    """The signing key from $ADAPTERS_AUDIT_KEY (None when unset or empty)."""
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def head_mac(key: bytes, seq: int, head: str) -> str:
    """The MAC of a chain head (domain-separated, so no other MAC can stand in for it)."""
    return hmac.new(key, f"adapters-audit-head:{seq}:{head}".encode(), hashlib.sha256).hexdigest()


def sign(state) -> None:
    """Set (or clear, without a key) the MAC of the state row's current head."""
    key = audit_key()
    if key is not None and len(key) < MIN_KEY_CHARS:
        raise RegistryError(f"{KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; use a long random secret")
    state.audit_mac = head_mac(key, state.audit_seq, state.audit_head) if key else None


def check(state) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the head's MAC under the current key."""
    key = audit_key()
    mac = getattr(state, "audit_mac", None)
    if key is None:
        return [], ([f"the audit head is signed; set {KEY_ENV} to check the signature"] if mac else [])
    if len(key) < MIN_KEY_CHARS:
        return [f"{KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; use a long random secret"], []
    if not mac:
        return [f"the audit head (event {state.audit_seq}) is not signed: it was written without "
                f"{KEY_ENV}, or the signature was removed"], []
    if not hmac.compare_digest(mac, head_mac(key, state.audit_seq, state.audit_head)):
        return [f"the audit head (event {state.audit_seq}) does not match its signature under {KEY_ENV} "
                "(the log was rewritten or cut, or the key differs)"], []
    return [], []
