"""`adapters rm artifact:N [--delete-files]`, and names suggested for unknown references."""

from __future__ import annotations

import pytest


def _artifact(reg, tmp_path, ref: str):
    out = tmp_path / "merged"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "sub" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file, not recorded")
    files = {"model.safetensors": None, "sub/config.json": None}
    from registry.copying import hash_file

    files = {rel: hash_file(out / rel)[0] for rel in files}
    return out, reg.register_artifact(kind="safetensors", path=out, files=files, recipe={}, inputs=[(ref, 1.0)])


def test_forget_an_artifact_then_delete_its_version(run_cli, make_adapter, reg, tmp_path):
    run_cli("push", make_adapter("a"), "--name", "team/x")
    out, art = _artifact(reg, tmp_path, "team/x:1")
    r = run_cli("rm", "team/x:1")
    assert r.code == 2 and "merged artifacts were built from it" in r.err
    (out / "model.safetensors").unlink()  # the user deleted the output: verify warns...
    assert "is missing" in " ".join(run_cli("verify", "--json").json()["warnings"])
    r = run_cli("rm", art.ref, "--json")
    assert r.code == 0 and r.json()["forgotten"] == art.ref and r.json()["files_deleted"] == 0
    assert (out / "sub" / "config.json").is_file()  # files are kept without --delete-files
    assert run_cli("verify", "--json").json()["warnings"] == []  # ...and stops once it is forgotten
    assert run_cli("show", art.ref).code == 2
    assert [e["action"] for e in run_cli("audit", "--json").json()][-2:] == ["forget", "verify"] or \
        "forget" in [e["action"] for e in run_cli("audit", "--json").json()]
    assert run_cli("rm", "team/x:1").code == 0  # nothing derives from it any more
    assert run_cli("verify").code == 0


def test_forget_with_delete_files_removes_only_what_was_recorded(run_cli, make_adapter, reg, tmp_path):
    run_cli("push", make_adapter("a"), "--name", "team/x")
    out, art = _artifact(reg, tmp_path, "team/x:1")
    r = run_cli("rm", art.ref, "--delete-files")
    assert r.code == 0 and "2 files deleted" in r.out, r.out + r.err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]  # the unrecorded file stays
    assert run_cli("rm", "team/x:1", "--delete-files").code == 2  # the flag is for artifacts


@pytest.mark.parametrize("args, hint", [
    (["show", "team/minilm-lorra"], "did you mean team/minilm-lora?"),
    (["pull", "team/minilm-lora@prd"], "did you mean team/minilm-lora@prod?"),
    (["untag", "team/minilm-lora", "prood"], "did you mean team/minilm-lora@prod?"),
])
def test_unknown_names_and_aliases_suggest_the_closest(run_cli, make_adapter, args, hint):
    run_cli("push", make_adapter("a"), "--name", "team/minilm-lora", "--tag", "prod")
    r = run_cli(*args)
    assert r.code == 2 and hint in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "did you mean" not in run_cli("show", "completely/else").err
