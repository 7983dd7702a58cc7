"""`adapters merge --to onnx`, `adapters run`, and the artifact's lineage, through the CLI.

The first merge runs as a real subprocess (its --json stdout must parse: no ONNX Runtime
or exporter noise); the others run in-process with click's runner, which also lets one
test break the merge on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.builders import (
    linear_shapes,
    write_lora_adapter,
    write_model_base,
    write_mora_adapter,
    write_tokenizer,
)
from tests.cli_runner import invoke, run_adapters

ROOT = Path(__file__).resolve().parents[2]


def adapters_subprocess(*args, home: Path) -> subprocess.CompletedProcess:
    return run_adapters(args, home=home, cwd=ROOT, timeout=600)


def adapters(*args, home: Path):
    """In-process `adapters ...` against the store at `home`."""
    return invoke(args, {"ADAPTERS_HOME": str(home)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = write_model_base(root / "base", "llama")
    write_tokenizer(base)
    bert = write_model_base(root / "bert", "bert")
    return {
        "root": root,
        "base": base,
        "bert": bert,
        "mora1": write_mora_adapter(root / "mora1", linear_shapes("llama"), mora_type=1, seed=1, scale=0.05),
        "mora6": write_mora_adapter(root / "mora6", linear_shapes("llama"), mora_type=6, r=4, seed=7, scale=0.05),
        "lora": write_lora_adapter(root / "lora", base, "llama", ["q_proj", "v_proj"]),
        "bert_mora": write_mora_adapter(root / "bert-mora", linear_shapes("bert"), mora_type=6, seed=1, scale=0.05),
    }


@pytest.fixture(scope="module")
def merged(files):
    """`adapters merge mora1 lora --weight 1 --weight 0.5 --to onnx --no-register --json`, a subprocess."""
    out = files["root"] / "merged"
    p = adapters_subprocess("merge", files["mora1"], files["lora"], "--weight", "1", "--weight", "0.5",
                            "--base", files["base"], "--to", "onnx", "-o", out, "--no-register", "--json",
                            home=files["root"] / "home-noreg")
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def _reference_next_token(files, ids: list[int]) -> int:
    """Next token from PyTorch: the base with both adapters applied unmerged."""
    from transformers import AutoModelForCausalLM

    from mora_core.adapter import load_adapter
    from mora_core.forward import apply_unmerged

    model = AutoModelForCausalLM.from_pretrained(str(files["base"]), attn_implementation="eager").eval()
    with apply_unmerged(model, [load_adapter(files["mora1"]), load_adapter(files["lora"])], [1.0, 0.5]), \
            torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return int(logits[0, -1].argmax())


def test_merge_to_onnx_json_summary(merged, files):
    out, s = merged
    assert s["to"] == "onnx" and Path(s["output"]) == out
    v = s["validation"]
    assert v["passed"] and v["provider"] == "cpu" and v["requested_provider"] == "auto"
    assert v["max_abs_diff"] <= v["atol"] and "unmerged_pytorch" in v["comparisons"]
    assert [a["weight"] for a in s["adapters"]] == [1.0, 0.5]
    assert "artifact" not in s
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_onnx_output_carries_its_own_model_card(merged, files):
    """README.md: relation merge, each adapter with weight and digest, each comparison with its
    figures (the card is listed among the output's digests too)."""
    import hashlib

    import yaml

    out, s = merged
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["adapter-registry", "merge", "onnx"]
    lora_digest = "sha256:" + hashlib.sha256((files["lora"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert f"| folder `{files['lora'].name}` | 0.5 | lora | `{lora_digest}` |" in card
    assert str(files["root"]) not in card  # no local path spelled out: the card may be published
    for c in s["validation"]["comparisons"].values():
        assert f"| {c['name']} | {len(c['cases'])} | {c['max_abs_diff']:.3g} | {c['worst_ratio']:.3g} | yes |" in card
    assert "## Files" not in card  # a function of the inputs: the same whether registered or not
    assert s["digests"]["README.md"] == "sha256:" + hashlib.sha256(card.encode()).hexdigest()


def test_run_prints_the_next_token_of_the_merged_model(merged, files):
    out, _ = merged
    ids = [3, 14, 15, 92, 65]
    r = adapters("run", out, "--ids", ",".join(map(str, ids)), "--json", home=files["root"] / "h")
    assert r.code == 0, r.err
    s = r.json()
    assert s["provider"] == "cpu" and s["output"] == "logits"
    assert s["next_token"][0]["id"] == _reference_next_token(files, ids)
    assert abs(sum(c["prob"] for c in s["next_token"])) <= 1.0 and len(s["next_token"]) == 5


def test_run_with_text_uses_the_copied_tokenizer(merged, files):
    out, _ = merged
    r = adapters("run", out, "--text", "w3 w14 w15", home=files["root"] / "h")
    assert r.code == 0, r.err
    assert "provider  cpu" in r.out and "input     3 tokens: 'w3' 'w14' 'w15'" in r.out
    assert "'w" in r.out  # decoded candidates
    # the same ids given as --ids are shown as text too, decoded as the tokenizers library decodes them
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files["base"] / "tokenizer.json"))
    ids = tok.encode("w3 w14 w15").ids
    r = adapters("run", out, "--ids", ",".join(map(str, ids)), "--json", home=files["root"] / "h")
    assert r.code == 0, r.err
    assert r.json()["input_tokens"] == [tok.decode([i]) for i in ids] == ["w3", "w14", "w15"]


def test_run_on_an_encoder_prints_an_embedding_summary(files):
    out = files["root"] / "bert-out"
    r = adapters("merge", files["bert_mora"], "--base", files["bert"], "--to", "onnx", "-o", out,
                 "--no-register", "--json", home=files["root"] / "h")
    assert r.code == 0, r.err
    r = adapters("run", out, "--ids", "1,2,3,4", "--json", home=files["root"] / "h")
    assert r.code == 0, r.err
    e = r.json()["embedding"]
    assert e["dim"] == 32 and e["shape"] == [1, 4, 32] and e["mean_pooled_norm"] > 0


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,200"], "outside the vocabulary"),
    (["--ids", "1,a"], "comma-separated integers"),
    ([], "exactly one of --text or --ids"),
])
def test_run_bad_input_is_one_line(merged, files, args, message):
    out, _ = merged
    r = adapters("run", out, *args, home=files["root"] / "h")
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err


def test_run_on_a_folder_without_graph(files):
    r = adapters("run", files["base"], "--ids", "1", home=files["root"] / "h")
    assert r.code == 2 and "no model.onnx" in r.err


def test_wrong_merge_exits_1_keeps_nothing_registers_nothing(files, monkeypatch):
    import exporters.model_build as mb

    home = files["root"] / "home-wrong"
    for name, folder in (("t/mora", files["mora1"]), ("t/lora", files["lora"])):
        assert adapters("push", folder, "--name", name, "--base", files["base"], home=home).code == 0
    real = mb.merge_plan
    monkeypatch.setattr(mb, "merge_plan", lambda layout, ads, ws: real(layout, ads[:1], ws[:1]))  # drops t/lora
    out = files["root"] / "wrong"
    r = adapters("merge", "t/mora", "t/lora", "--base", files["base"], "--to", "onnx", "-o", out, home=home)
    assert r.code == 1, r.err
    assert r.err.startswith("error: validation failed on cpu: ONNX vs base + unmerged adapters")
    assert r.err.count("\n") == 1
    assert not out.exists() and not list(files["root"].glob(".wrong.partial-*"))
    lineage = adapters("lineage", "t/lora", "--json", home=home).json()
    assert not [n for n in lineage["nodes"] if n["type"] == "artifact"]


def test_bad_input_through_the_cli(files, tmp_path):
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    (neox / "model.safetensors").write_bytes((files["base"] / "model.safetensors").read_bytes())
    r = adapters("merge", files["mora1"], "--base", neox, "--to", "onnx", "-o", tmp_path / "o", "--no-register",
                 home=tmp_path / "h")
    assert r.code == 2 and "GPTNeoXForCausalLM" in r.err and "Traceback" not in r.err
    assert r.err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_explicit_gpu_provider_without_gpu_is_refused(files, tmp_path):
    from exporters.providers import can_run

    if can_run("cuda"):
        pytest.skip("this machine has a working CUDA provider")
    r = adapters("merge", files["mora1"], "--base", files["base"], "--to", "onnx", "-o", tmp_path / "o",
                 "--provider", "cuda", "--no-register", home=tmp_path / "h")
    assert r.code == 2 and "CUDAExecutionProvider cannot create a session" in r.err
    assert not (tmp_path / "o").exists()


def test_lineage_of_an_onnx_artifact_end_to_end(files):
    """push two adapters, merge the references to ONNX, then lineage/show/verify the artifact."""
    home = files["root"] / "home-lineage"
    for name, folder in (("team/mora", files["mora6"]), ("team/lora", files["lora"])):
        r = adapters("push", folder, "--name", name, "--base", files["base"], home=home)
        assert r.code == 0, r.err
    out = files["root"] / "lineage-out"
    r = adapters("merge", "team/mora", "team/lora:1", "--weight", "0.8", "--weight", "0.5", "--base", files["base"],
                 "--to", "onnx", "-o", out, "--json", home=home)
    assert r.code == 0, r.err
    s = r.json()
    art = s["artifact"]["ref"]
    assert s["artifact"]["kind"] == "onnx"

    for ref, weight in (("team/mora:1", 0.8), ("team/lora:1", 0.5)):
        g = adapters("lineage", ref, "--json", home=home).json()
        assert [n["id"] for n in g["nodes"] if n["type"] == "artifact"] == [art]
        assert {"from": ref, "to": art, "kind": "input", "weight": weight} in g["edges"]

    shown = adapters("show", art, "--json", home=home).json()
    recipe = shown["recipe"]
    assert recipe["kind"] == "onnx" and recipe["opset"] == s["opset"]
    assert [(a["ref"], a["weight"]) for a in recipe["adapters"]] == [("team/mora:1", 0.8), ("team/lora:1", 0.5)]
    assert recipe["base"]["files"]["model.safetensors"]
    assert recipe["export"]["files"]["model.onnx"]["sha256"] == shown["files"]["model.onnx"]
    assert shown["report"]["passed"] and shown["report"]["provider"] == "cpu"
    assert "torch" in recipe["tools"]

    assert adapters("verify", home=home).code == 0
    with open(out / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    v = adapters("verify", home=home)
    assert v.code == 1 and "model.onnx" in (v.out + v.err)


def test_run_does_not_import_torch(merged):
    """Serving needs ONNX Runtime only: `adapters run --ids` must not pay for torch."""
    out, _ = merged
    code = ("import sys; from adapters_cli.main import main; rc = main(['run', sys.argv[1], '--ids', '1,2', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["next_token"]


# --------------------------------------------------------------------------- adapters generate


def _reference_greedy(files, ids: list[int], new: int) -> list[int]:
    """transformers' greedy generate on the base with both adapters applied unmerged."""
    from transformers import AutoModelForCausalLM

    from mora_core.adapter import load_adapter
    from mora_core.forward import apply_unmerged

    model = AutoModelForCausalLM.from_pretrained(str(files["base"]), attn_implementation="eager").eval()
    with apply_unmerged(model, [load_adapter(files["mora1"]), load_adapter(files["lora"])], [1.0, 0.5]), \
            torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]


def test_merge_writes_a_kv_cache_graph_with_genai_config(merged):
    out, s = merged
    assert s["kv_cache"] is True and "generation" in s["validation"]["comparisons"]
    assert (out / "genai_config.json").is_file()


@pytest.mark.parametrize("engine", ["genai", "ort"])
def test_generate_from_ids(merged, files, engine):
    out, _ = merged
    ids = [3, 14, 15, 92, 65]
    r = adapters("generate", out, "--ids", ",".join(map(str, ids)), "--max-new-tokens", "10", "--engine", engine,
                 "--json", home=files["root"] / "h")
    assert r.code == 0, r.err
    s = r.json()
    assert s["tokens"] == _reference_greedy(files, ids, 10)[: len(s["tokens"])] and len(s["tokens"]) >= 1
    assert s["engine"] == engine and s["provider"] == "cpu" and s["prompt_ids"] == ids
    assert s["time_to_first_token_s"] > 0 and s["tokens_per_s"] >= 0
    assert s["text"] and all(w.startswith("w") for w in s["text"].split())  # decoded by the copied tokenizer


def test_generate_from_text_equals_generate_from_ids(merged, files):
    out, _ = merged
    by_text = adapters("generate", out, "--prompt", "w3 w14 w15", "--max-new-tokens", "6", "--json",
                       home=files["root"] / "h")
    by_ids = adapters("generate", out, "--ids", "3,14,15", "--max-new-tokens", "6", "--json", home=files["root"] / "h")
    assert by_text.code == 0 and by_ids.code == 0, by_text.err + by_ids.err
    assert by_text.json()["prompt_ids"] == [3, 14, 15]
    assert by_text.json()["tokens"] == by_ids.json()["tokens"]
    plain = adapters("generate", out, "--prompt", "w3 w14 w15", "--max-new-tokens", "6", home=files["root"] / "h")
    assert plain.code == 0 and plain.out.strip() == by_text.json()["text"]  # not a TTY: the text, once
    assert "genai on cpu" in plain.err and "tokens/s" in plain.err


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,200"], "token id 200 is outside the vocabulary"),
    (["--ids", "1,x"], "comma-separated integers"),
    (["--ids", "1", "--prompt", "w1"], "exactly one of --prompt or --ids"),
    (["--ids", ",".join(["1"] * 64)], "the prompt has 64 tokens; the model's context is 64"),
])
def test_generate_bad_input_is_one_line(merged, files, args, message):
    out, _ = merged
    r = adapters("generate", out, *args, home=files["root"] / "h")
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err


def test_generate_streams_text_on_a_terminal(capsys):
    from adapters_cli.generate import _Stream

    class Tok:
        def decode(self, ids):
            return "".join(["ab", "\ufffd", "c"][i] for i in ids).replace("\ufffdc", "é")

    stream = _Stream(Tok(), enabled=True)
    for t in (0, 1, 2):
        stream.token(t)
    stream.finish()
    assert capsys.readouterr().out == "abé\n"  # an incomplete piece waits for the next token


def test_generate_does_not_import_torch(merged):
    out, _ = merged
    code = ("import sys; from adapters_cli.main import main; "
            "rc = main(['generate', sys.argv[1], '--ids', '1,2', '--max-new-tokens', '3', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["tokens"]) == 3
