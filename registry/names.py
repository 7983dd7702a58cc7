"""Adapter names, references and metadata keys: parsing, formatting and validation, no database.

Names are path-like (`team/llama-mora`) but must never escape the store or be
ambiguous in a reference, so: lowercase letters, digits and `-_./`, no `..`, no
leading or trailing `/`, no `//`. A reference is one of

    name            the latest version of `name`
    name:N          version N
    name@alias      the version an alias points at
    name@sha256:P   the version whose digest starts with P (at least 12 hex digits)
    artifact:ID  /  artifact@sha256:P   a registered merge output

`version_ref` and `artifact_ref` write the canonical forms back (the only place they are
spelled out); `parse_ref` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from registry.errors import RegistryError

# Always applied with `fullmatch`: `$` would also match before a final newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._/-]*")
ALIAS_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
HEX_RE = re.compile(r"[0-9a-f]+")
DIGITS_RE = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '²', which int() refuses
MAX_INT = 2**31 - 1  # the database's INTEGER range (PostgreSQL `integer`): version numbers, ids, r
MIN_PREFIX = 12
MAX_NAME = 200
ARTIFACT = "artifact"  # reserved: artifact references start with it
MAX_META = 64


def version_ref(name: str, number: int) -> str:
    """`name:N`, the canonical reference of a version."""
    return f"{name}:{number}"


def artifact_ref(artifact_id: int) -> str:
    """`artifact:ID`, the canonical reference of an artifact."""
    return f"{ARTIFACT}:{artifact_id}"


def alias_ref(name: str, alias: str) -> str:
    """`name@alias`."""
    return f"{name}@{alias}"


def check_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise `RegistryError`."""
    if not isinstance(name, str) or not name:
        raise RegistryError("adapter name is empty")
    if len(name) > MAX_NAME:
        raise RegistryError(f"adapter name {name[:40]!r}...: longer than {MAX_NAME} characters")
    if name.startswith("/") or ".." in name or "//" in name or name.endswith("/") or "." in name.split("/"):
        raise RegistryError(f"adapter name {name!r}: no leading/trailing '/', '//', '.' or '..' segments allowed")
    if not NAME_RE.fullmatch(name):
        raise RegistryError(f"adapter name {name!r}: use lowercase letters, digits and -_./ only")
    if name == ARTIFACT or name.startswith(ARTIFACT + "/"):
        raise RegistryError(f"adapter name {name!r}: '{ARTIFACT}' is reserved for merge outputs")
    return name


def check_alias(alias: str) -> str:
    """Return `alias` if valid (like a name segment, and not all digits nor `sha256`)."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or len(alias) > 100:
        raise RegistryError(f"alias {alias!r}: use lowercase letters, digits and -_. only")
    if alias == "sha256" or alias.startswith("sha256:"):
        raise RegistryError(f"alias {alias!r}: reserved")
    return alias


def parse_int(text: str, what: str, *, minimum: int = 0) -> int:
    """A non-negative decimal integer in ASCII digits that fits the database, else RegistryError.

    `what` names the input in the message (e.g. "reference 'x:2'", "--where r=3").
    """
    if not isinstance(text, str) or not DIGITS_RE.fullmatch(text):
        raise RegistryError(f"{what}: {text!r} is not a number (digits 0-9)")
    if len(text.lstrip("0")) > len(str(MAX_INT)) or int(text) > MAX_INT:
        raise RegistryError(f"{what}: {text} is too large (at most {MAX_INT})")
    n = int(text)
    if n < minimum:
        raise RegistryError(f"{what}: must be at least {minimum}")
    return n


def check_count(value: int | None, what: str) -> int | None:
    """A `--limit`/`--offset` style count: None, or 0..MAX_INT (RegistryError otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise RegistryError(f"{what} {value!r}: expected a whole number from 0 to {MAX_INT}")
    return value


def check_text(value: str | None, what: str, max_chars: int, *, lines: bool = False) -> str | None:
    """Free text a user gives (`--base-model`, `-m`): None, or at most `max_chars` printable
    characters (`lines`: newlines and tabs allowed too), else RegistryError naming `what`.

    The limits are the database columns' (PostgreSQL refuses longer text with an error).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise RegistryError(f"{what}: expected text")
    if len(value) > max_chars:
        raise RegistryError(f"{what} {value[:40]!r}...: {len(value)} characters, at most {max_chars}")
    allowed = "\n\t" if lines else ""
    bad = next((c for c in value if not c.isprintable() and c not in allowed), None)
    if bad is not None:
        raise RegistryError(f"{what} {value[:40]!r}: control character {bad!r} not allowed")
    return value


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of number/alias/digest_prefix is set, or none (latest)."""

    name: str
    number: int | None = None
    alias: str | None = None
    digest_prefix: str | None = None
    artifact_id: int | None = None

    @property
    def is_artifact(self) -> bool:
        return self.name == ARTIFACT


def _check_prefix(text: str, prefix: str) -> str:
    p = prefix.lower()
    if not HEX_RE.fullmatch(p) or len(p) > 64:
        raise RegistryError(f"reference {text!r}: digest must be hex")
    if len(p) < MIN_PREFIX:
        raise RegistryError(f"reference {text!r}: digest prefix needs at least {MIN_PREFIX} hex digits")
    return p


def parse_ref(text: str) -> Ref:
    """Parse a reference string; raises `RegistryError` naming the input when malformed."""
    if not isinstance(text, str) or not text.strip():
        raise RegistryError("empty reference")
    text = text.strip()
    if text.startswith(ARTIFACT + ":") or text.startswith(ARTIFACT + "@"):
        rest = text[len(ARTIFACT) + 1:]
        if text[len(ARTIFACT)] == ":":
            return Ref(ARTIFACT, artifact_id=parse_int(rest, f"reference {text!r}: artifact id"))
        if not rest.startswith("sha256:"):
            raise RegistryError(f"reference {text!r}: use artifact:ID or artifact@sha256:PREFIX")
        return Ref(ARTIFACT, digest_prefix=_check_prefix(text, rest[7:]))
    if "@" in text:
        name, _, tail = text.partition("@")
        check_name(name)
        if tail.startswith("sha256:"):
            return Ref(name, digest_prefix=_check_prefix(text, tail[7:]))
        if not ALIAS_RE.fullmatch(tail):
            raise RegistryError(f"reference {text!r}: bad alias {tail!r}")
        return Ref(name, alias=tail)
    if ":" in text:
        name, _, num = text.rpartition(":")
        check_name(name)
        if not DIGITS_RE.fullmatch(num) or int(num) < 1:
            raise RegistryError(f"reference {text!r}: version must be a positive number")
        return Ref(name, number=parse_int(num, f"reference {text!r}: version", minimum=1))
    return Ref(check_name(text))


def split_kv(item: str, what: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY stripped, VALUE); `what` names the option in the error."""
    if "=" not in item:
        raise RegistryError(f"{what} {item!r}: expected KEY=VALUE")
    k, _, v = item.partition("=")
    return k.strip(), v


def parse_meta(meta: dict[str, str] | Iterable[str] | None) -> dict[str, str]:
    """`{"k": "v"}` or `["k=v", ...]` -> validated dict (keys: letters, digits, -_.)."""
    if meta is None:
        return {}
    items = meta.items() if isinstance(meta, dict) else (split_kv(m, "--meta") for m in meta)
    out = {}
    for k, v in items:
        k, v = str(k), str(v)
        if not k or len(k) > 100 or not k.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise RegistryError(f"metadata key {k!r}: use letters, digits and -_. (at most 100)")
        if len(v) > 500:
            raise RegistryError(f"metadata {k}: value longer than 500 characters")
        out[k] = check_text(v, f"metadata {k}", 500)
    if len(out) > MAX_META:
        raise RegistryError(f"at most {MAX_META} metadata entries")
    return out
