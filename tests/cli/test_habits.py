"""Help with examples on every command, shell completion of references, JSON people can read."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import invoke


def _commands() -> list[list[str]]:
    from adapters_cli.main import COMMANDS

    out = []
    for name, load in COMMANDS.items():
        cmd = load()
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_every_command_help_has_an_example(argv):
    r = invoke([*argv, "--help"])
    assert r.code == 0 and "Example" in r.out, r.out
    assert "--home" in r.out and "--json" in r.out and "--db-url" in r.out or argv == ["db"], r.out


def _complete(words: str, env: dict[str, str]) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    import os

    from click.testing import CliRunner

    from adapters_cli.main import cli

    full = {**{k: v for k, v in os.environ.items() if not k.startswith("ADAPTERS_")}, **env,
            "_ADAPTERS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    res = CliRunner().invoke(cli, [], env=full, prog_name="adapters")
    return [line.split(",", 1)[1] for line in res.stdout.splitlines() if "," in line]


def test_references_complete_from_the_store(make_adapter, run_cli, store_env):
    run_cli("push", make_adapter("a", seed=1), "--name", "team/minilm-lora", "--tag", "prod")
    run_cli("push", make_adapter("b", seed=2), "--name", "team/minilm-lora", "--tag", "staging")
    run_cli("push", make_adapter("c", seed=3), "--name", "other/x")
    env = {"ADAPTERS_HOME": store_env["ADAPTERS_HOME"], **({"ADAPTERS_DB_URL": store_env["ADAPTERS_DB_URL"]}
                                                          if "ADAPTERS_DB_URL" in store_env else {})}
    assert _complete("adapters pull te", env) == ["team/minilm-lora"]
    assert _complete("adapters show team/minilm-lora:", env) == ["team/minilm-lora:2", "team/minilm-lora:1"]
    assert _complete("adapters tag team/minilm-lora@st", env) == ["team/minilm-lora@staging"]
    assert set(_complete("adapters merge ", env)) == {"other/x", "team/minilm-lora"}


def test_completion_never_creates_a_store(tmp_path):
    home = tmp_path / "nowhere"
    assert _complete("adapters pull te", {"ADAPTERS_HOME": str(home)}) == []
    assert not home.exists()


def test_json_keeps_plain_lists_on_one_line():
    from adapters_cli.common import to_json

    obj = {"input_ids": [1, 2, 3, 4], "cases": [{"shape": [2, 16]}], "empty": {}, "none": []}
    text = to_json(obj)
    assert '"input_ids": [1, 2, 3, 4]' in text and '"shape": [2, 16]' in text
    assert json.loads(text) == obj


def test_onnx_summary_names_each_comparison_and_its_ratio_to_the_tolerance(capsys):
    from adapters_cli.merge import _print_human

    comparison = {"name": "base + unmerged adapters (PyTorch)", "max_abs_diff": 7.1e-7, "max_rel_diff": 2.7e-3,
                  "worst_ratio": 0.0063, "passed": True}
    _print_human({"output": "out", "to": "onnx", "adapters": [], "validation": {
        "provider": "cpu", "passed": True, "atol": 1e-4, "rtol": 1e-4, "max_abs_diff": 7.1e-7,
        "max_rel_diff": 2.7e-3, "comparisons": {"unmerged_pytorch": comparison}}})
    out = capsys.readouterr().out
    assert "pass on cpu, |onnx - ref| <= 0.0001 + 0.0001*|ref|" in out
    assert "vs base + unmerged adapters (PyTorch): max abs 7.1e-07, worst 0.0063x the tolerance" in out
    assert "0.0027" not in out  # a relative error above rtol would look like a failure on a pass
