"""Hostile input to the registry commands (issue 12, points 8-10 on the store side).

Each row of CASES runs one `adapters ...` command against a store holding `t/lora:1`
(alias `prod`). Every row must give exit code 2, exactly one `error:` line on stderr, no
traceback, the store unchanged and nothing written anywhere under the test's folder; with
`--json` the same error also comes as a JSON object on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import store_snapshot

BIG = "99999999999999999999"  # > 2**64: overflowed SQLite/PostgreSQL integers (a traceback before)

# id -> (argv with {adapter}/{tmp} placeholders, text the error line must contain)
CASES: dict[str, tuple[list[str], str]] = {
    "ref unicode digit": (["show", "t/lora:²"], "t/lora:²"),
    "ref unicode digit pull": (["pull", "t/lora:²", "-o", "{tmp}/out"], "version must be a positive number"),
    "ref huge number": (["show", f"t/lora:{BIG}"], "too large"),
    "ref huge number rm": (["rm", f"t/lora:{BIG}"], "too large"),
    "ref huge number lineage": (["lineage", f"t/lora:{BIG}", "--format", "dot"], "too large"),
    "ref huge number audit": (["audit", f"t/lora:{BIG}"], "too large"),
    "artifact huge id": (["show", f"artifact:{BIG}"], "too large"),
    "artifact unicode id": (["show", "artifact:٣"], "not a number"),
    "list huge limit": (["list", "--limit", BIG], "--limit"),
    "list huge offset": (["list", "--offset", BIG], "--offset"),
    "list negative limit": (["list", "--limit", "-1"], "--limit"),
    "audit negative limit": (["audit", "--limit", "-5"], "--limit"),
    "audit huge limit": (["audit", "--limit", BIG], "--limit"),
    "list bad option value": (["list", "--limit", "ten"], "--limit"),
    "unknown option": (["show", "t/lora", "--colour"], "--colour"),
    "name ending in newline": (["push", "{adapter}", "--name", "t/x\n"], "adapter name"),
    "alias ending in newline": (["tag", "t/lora:1", "prod\n"], "alias"),
    "push tag ending in newline": (["push", "{adapter}", "--name", "t/x", "--tag", "a\n"], "alias"),
    "alias unicode": (["tag", "t/lora:1", "prod²"], "alias"),
    "name unicode": (["list", "t/lóra"], "adapter name"),
    "show on a missing home": (["show", "t/lora", "--home", "{tmp}/nohome"], "no registry there"),
    "verify on a missing home": (["verify", "--home", "{tmp}/nohome"], "does not exist"),
    "tag on a missing home": (["tag", "t/lora:1", "x", "--home", "{tmp}/nohome"], "push` creates one"),
    "base model too long": (["push", "{adapter}", "--name", "t/x", "--base-model", "b" * 10_000], "at most 300"),
    "base model with a newline": (["push", "{adapter}", "--name", "t/x", "--base-model", "org/m\nx"],
                                  "control character"),
    "base revision too long": (["push", "{adapter}", "--name", "t/x", "--base-revision", "r" * 201], "at most 200"),
    "message too long": (["push", "{adapter}", "--name", "t/x", "-m", "m" * 4001], "at most 4000"),
    "meta value with a control character": (["push", "{adapter}", "--name", "t/x", "--meta", "k=a\x1bb"],
                                            "control character"),
    "where unicode digit": (["list", "--where", "r=²"], "not a number"),
    "where huge number": (["list", "--where", f"mora_type={BIG}"], "too large"),
}


@pytest.fixture
def hostile_store(run_cli, make_adapter, reg, registry_home):
    r = run_cli("push", make_adapter("seed", seed=1), "--name", "t/lora", "--tag", "prod")
    assert r.code == 0, r.err
    return make_adapter("other", seed=2)


def _tree(root: Path) -> list[tuple[str, int]]:
    """Every file under root with its size, except the database files (compared row by row)."""
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                  if p.is_file() and "registry.db" not in p.name)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_registry_input(case, as_json, hostile_store, run_cli, reg, registry_home, tmp_path):
    argv, needle = CASES[case]
    argv = [a.replace("{adapter}", str(hostile_store)).replace("{tmp}", str(tmp_path)) for a in argv]
    if as_json:
        argv.append("--json")
    before, files = store_snapshot(registry_home, reg), _tree(tmp_path)
    r = run_cli(*argv)
    lines = r.err.strip().splitlines()
    assert r.code == 2, (r.code, r.out, r.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.err
    assert "Traceback" not in r.err + r.out
    if as_json:
        assert json.loads(r.out) == {"error": lines[0][len("error: "):], "code": 2}
    else:
        assert r.out == ""
    assert store_snapshot(registry_home, reg) == before
    assert _tree(tmp_path) == files


def test_json_error_object_for_every_failing_command(hostile_store, run_cli):
    """Scripts reading stdout of `--json` get a JSON document for a failure too (here: unknown refs)."""
    for argv in (["show", "t/none"], ["pull", "t/none"], ["tag", "t/none:1", "a"], ["rm", "t/none:1"],
                 ["lineage", "t/none"], ["audit", "t/none:1"], ["untag", "t/lora", "nope"]):
        r = run_cli(*argv, "--json")
        err = json.loads(r.out)
        assert r.code == 2 and err["code"] == 2 and r.err.strip() == f"error: {err['error']}", argv


def test_show_prints_fields_whole(run_cli, make_adapter, reg):
    long_value = "v" * 600
    meta = [f"--meta=k{i}={long_value[:400]}" for i in range(3)]
    assert run_cli("push", make_adapter("a"), "--name", "t/long", *meta).code == 0
    out = run_cli("show", "t/long").out
    assert "..." not in out
    meta_line = next(ln for ln in out.splitlines() if ln.startswith("meta:"))
    assert json.loads(meta_line.split(None, 1)[1]) == {f"k{i}": long_value[:400] for i in range(3)}


def test_reading_a_missing_home_creates_nothing(run_cli, tmp_path):
    home = tmp_path / "typo-home"
    r = run_cli("list", "--home", home)
    assert r.code == 0 and r.out == "" and "does not exist" in r.err and not home.exists()
    assert run_cli("list", "--home", home, "--json").json() == [] and not home.exists()
    for argv in (["show", "t/a"], ["audit"], ["gc"], ["lineage", "t/a"], ["pull", "t/a", "-o", tmp_path / "o"]):
        r = run_cli(*argv, "--home", home)
        assert r.code == 2 and "no registry there" in r.err and not home.exists(), argv


def test_list_says_when_nothing_is_there(run_cli, make_adapter, reg):
    r = run_cli("list")
    assert r.code == 0 and r.out == "" and "no versions" in r.err and "push" in r.err
    assert run_cli("list", "--json").json() == []
    run_cli("push", make_adapter("a"), "--name", "t/a")
    r = run_cli("list", "--where", "kind=mora")
    assert r.code == 0 and r.out == "" and "no versions match" in r.err
