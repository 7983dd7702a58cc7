"""Names and references: property tests (hypothesis) for parsing and refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.errors import RegistryError
from registry.names import check_name, parse_ref

segment = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True)
names = st.lists(segment, min_size=1, max_size=4).map("/".join).filter(
    lambda n: n != "artifact" and not n.startswith("artifact/"))


@given(names, st.integers(1, 10**6))
def test_number_refs_round_trip(name, n):
    r = parse_ref(f"{name}:{n}")
    assert (r.name, r.number, r.alias, r.digest_prefix) == (name, n, None, None)


@given(names, segment)
def test_alias_refs_round_trip(name, alias):
    r = parse_ref(f"{name}@{alias}")
    assert (r.name, r.alias, r.number) == (name, alias, None)


@given(names, st.text("0123456789abcdef", min_size=12, max_size=64))
def test_digest_refs_round_trip(name, prefix):
    r = parse_ref(f"{name}@sha256:{prefix}")
    assert (r.name, r.digest_prefix) == (name, prefix)


@given(st.text(min_size=1, max_size=30))
def test_accepted_names_never_escape(text):
    try:
        name = check_name(text)
    except RegistryError as exc:
        assert str(exc).startswith(("adapter name", "adapter name is empty"))
        return
    parts = name.split("/")
    assert not name.startswith("/") and ".." not in name and "." not in parts and "" not in parts
    assert name == name.lower() and name.isascii()


@pytest.mark.parametrize("bad", ["", " ", "x:", "x:-1", "x@", "x@sha256:", "artifact:x", "artifact@foo"])
def test_malformed_refs(bad):
    with pytest.raises(RegistryError):
        parse_ref(bad)
