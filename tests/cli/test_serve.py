"""`adapters export --slots` and `adapters pack` through the CLI, served with ONNX Runtime's own API.

One slots graph is exported (in-process CLI, registered, with the plain signature:
`--no-kv-cache`; the KV layout is tested in tests/exporters/test_slot_generation.py) for
seven adapters on a tiny Llama: peft LoRAs of rank 2 and 6 (the rank-2 one pushed to the registry first) and MoRA
types 1, 2, 3, 4, 6. The adapter files written by `adapters pack` are then served with
nothing but `onnxruntime.LoraAdapter` + `RunOptions.add_active_adapter` on ONE session,
and checked against references the exporter does not use: peft's own forward for LoRA,
and the transformers base model for "no adapter".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter
from tests.cli_runner import invoke

TYPES = (1, 2, 3, 4, 6)


def adapters(*args, home: Path):
    return invoke(args, {"ADAPTERS_HOME": str(home)})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    base = write_model_base(root / "base", "llama")
    f = {"root": root, "home": home, "base": base,
         "lora2": write_lora_adapter(root / "lora2", base, "llama", ["q_proj", "v_proj"], r=2, seed=3),
         "lora6": write_lora_adapter(root / "lora6", base, "llama", ["q_proj", "v_proj"], r=6, seed=4)}
    for t in TYPES:
        f[f"mora{t}"] = write_mora_adapter(root / f"mora{t}", linear_shapes("llama"), mora_type=t, seed=10 + t,
                                           scale=0.05)
    pushed = adapters("push", f["lora2"], "--name", "team/lora", "--base", base, home=home)
    assert pushed.code == 0, pushed.err
    f["lora_ref"] = pushed.out.strip()
    pushed = adapters("push", f["mora1"], "--name", "team/mora", "--base", base, home=home)
    assert pushed.code == 0, pushed.err
    f["mora_ref"] = pushed.out.strip()
    res = adapters("export", "--base", base, "--to", "onnx", "--slots", f["lora_ref"], f["lora6"], f["mora_ref"],
                   *(f[f"mora{t}"] for t in TYPES[1:]), "-o", root / "slots", "--no-kv-cache", "--json", home=home)
    assert res.code == 0, res.err
    f["summary"] = res.json()
    f["graph"] = root / "slots"
    return f


def _pack(env, adapter, name: str, *extra) -> Path:
    out = env["root"] / f"{name}.onnx_adapter"
    if not out.exists():
        res = adapters("pack", adapter, "--graph", env["graph"], "-o", out, *extra, "--json", home=env["home"])
        assert res.code == 0, res.err
    return out


def _hf_base(env):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(env["base"]), attn_implementation="eager").eval()


def _batch(seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, 96, size=(3, 13), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding, as a decoder batch is padded
    mask[2, :9] = 0
    return ids, mask


def _peft_logits(env, folder: Path, ids, mask) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_hf_base(env), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _close(got, ref, mask, tol=1e-4):
    sel = mask.astype(bool)
    np.testing.assert_allclose(got[sel], ref[sel], atol=tol, rtol=tol)


def test_export_is_validated_for_every_adapter_and_for_no_adapter(env):
    s = env["summary"]
    v = s["validation"]
    assert v["passed"] and v["provider"] == "cpu"
    names = set(v["comparisons"])
    assert "no adapter" in names and len(names) == 1 + 2 + len(TYPES)
    for comp in v["comparisons"].values():
        assert comp["passed"] and comp["max_abs_diff"] < 1e-4 and len(comp["cases"]) == 5
    kinds = {(sl["kind"], sl.get("mora_type")) for sl in s["slots"]}
    assert kinds == {("lora", None), *(("mora", t) for t in TYPES)}
    assert s["artifact"]["kind"] == "onnx_slots"
    assert [a["position"] for a in s["adapters"]] == list(range(7))


def test_graph_has_the_merged_inputs_and_overridable_slots(env):
    import onnx

    sess = ort.InferenceSession(str(env["graph"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    over = {i.name: i.shape for i in sess.get_overridable_initializers()}
    a = over["model.layers.0.self_attn.q_proj.lora_A"]
    b = over["model.layers.0.self_attn.q_proj.lora_B"]
    assert isinstance(a[0], str) and a[1] == 32 and b[0] == 32 and b[1] == a[0]  # one dynamic rank axis
    assert "model.layers.1.mlp.down_proj.lora_A" not in over  # peft LoRAs target q_proj/v_proj only
    assert over["model.layers.0.self_attn.q_proj.mora_M.t6r22"] == [22, 22]
    # no dense delta, compress or decompress matrix: every float initializer of 2 or more axes that
    # is not a slot default is a base weight (either layout) or a type 6 RoPE table [blocks, 2, r_hat/2]
    model = onnx.load(str(env["graph"] / "model.onnx"))
    base_shapes = {tuple(p.shape) for p in _hf_base(env).parameters()}
    base_shapes |= {s[::-1] for s in base_shapes}
    halves = {sl["r_hat"] // 2 for sl in env["summary"]["slots"] if sl.get("mora_type") == 6}
    tables = 0
    for init in model.graph.initializer:
        if init.name in over or len(init.dims) < 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        dims = tuple(init.dims)
        if len(dims) == 3 and dims[1] == 2 and dims[2] in halves:
            tables += 1
            continue
        assert len(dims) == 2 and dims in base_shapes, (init.name, dims)
    assert tables  # type 6's cos and sin tables are there


def test_lora_ranks_2_and_6_and_mora_switched_on_one_session(env):
    """Only onnxruntime's own API; references from peft and transformers, not from the exporter."""
    files = {"lora2": _pack(env, env["lora_ref"], "lora2"), "lora6": _pack(env, env["lora6"], "lora6"),
             "mora1": _pack(env, env["mora_ref"], "mora1")}
    ids, mask = _batch()
    with torch.no_grad():
        base_ref = _hf_base(env)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    refs = {"lora2": _peft_logits(env, env["lora2"], ids, mask), "lora6": _peft_logits(env, env["lora6"], ids, mask),
            None: base_ref, "mora1": _mora_ref(env, "mora1", ids, mask)}
    sess = ort.InferenceSession(str(env["graph"] / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = {}
    for k, path in files.items():
        loaded[k] = ort.LoraAdapter()
        loaded[k].Load(str(path))
    feeds = {"input_ids": ids, "attention_mask": mask}
    for which in ["lora2", "lora6", None, "lora2", "mora1", "lora6", None, "mora1", "lora2"]:
        opts = ort.RunOptions()
        if which is not None:
            opts.add_active_adapter(loaded[which])
        got = sess.run(None, feeds, opts)[0]
        _close(got, refs[which], mask)
    assert np.abs(refs["lora2"] - base_ref).max() > 1e-3 and np.abs(refs["lora6"] - refs["lora2"]).max() > 1e-3


def _mora_ref(env, name: str, ids, mask, weight: float = 1.0) -> np.ndarray:
    from mora_core.adapter import load_adapter
    from mora_core.forward import apply_unmerged

    model = _hf_base(env)
    with torch.no_grad(), apply_unmerged(model, [load_adapter(env[name])], [weight]):
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("mora_type", TYPES)
def test_every_mora_type_served_from_its_file(env, mora_type):
    path = _pack(env, env[f"mora{mora_type}"], f"mora{mora_type}w", "--weight", "-0.7")
    ids, mask = _batch(mora_type)
    sess = ort.InferenceSession(str(env["graph"] / "model.onnx"), providers=["CPUExecutionProvider"])
    ad = ort.LoraAdapter()
    ad.Load(str(path))
    opts = ort.RunOptions()
    opts.add_active_adapter(ad)
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask}, opts)[0]
    ref = _mora_ref(env, f"mora{mora_type}", ids, mask, weight=-0.7)
    _close(got, ref, mask)
    assert np.abs(ref - _mora_ref(env, f"mora{mora_type}", ids, mask, weight=0.0)).max() > 1e-3


def test_pack_folds_scaling_and_weight(env):
    from safetensors.torch import load_file

    from exporters.ort_adapter import read_adapter_file

    path = _pack(env, env["lora6"], "lora6-half", "--weight", "0.5")
    params = read_adapter_file(path)
    saved = load_file(str(env["lora6"] / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    cfg = json.loads((env["lora6"] / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    np.testing.assert_allclose(params["model.layers.1.self_attn.v_proj.lora_A"], saved[f"{key}.lora_A.weight"].numpy())
    np.testing.assert_allclose(params["model.layers.1.self_attn.v_proj.lora_B"],
                               saved[f"{key}.lora_B.weight"].numpy() * scaling * 0.5, rtol=1e-6)
    assert len(params) == 2 * 2 * 2  # q/v of two layers, A and B


def test_misfit_adapters_are_refused_naming_the_module(env):
    root, home = env["root"], env["home"]
    before = adapters("list", "--json", home=home).out
    other_rank = write_mora_adapter(root / "mora1-r4", linear_shapes("llama"), mora_type=1, r=4, seed=3)
    out = root / "misfit.onnx_adapter"
    res = adapters("pack", other_rank, "--graph", env["graph"], "-o", out, home=home)
    assert res.code == 2 and res.err.startswith("error: ") and len(res.err.strip().splitlines()) == 1
    assert "module model.layers.0.mlp.down_proj" in res.err and "MoRA type 1 r_hat" in res.err
    not_slotted = write_lora_adapter(root / "lora-o", env["base"], "llama", ["o_proj"], r=2)
    res = adapters("pack", not_slotted, "--graph", env["graph"], "-o", out, home=home)
    assert res.code == 2 and "model.layers.0.self_attn.o_proj is not slotted" in res.err
    assert not out.exists() and not list(root.glob(".misfit*"))
    assert adapters("list", "--json", home=home).out == before


def test_lineage_version_to_adapter_file_to_graph(env):
    from registry.api import Registry

    path = _pack(env, env["lora_ref"], "lora2")
    graph_ref = env["summary"]["artifact"]["ref"]
    with Registry.open(env["home"]) as reg:
        lin = reg.lineage(env["lora_ref"])
        kinds = {n["id"]: n.get("kind") for n in lin["nodes"] if n["type"] == "artifact"}
        assert graph_ref in kinds and kinds[graph_ref] == "onnx_slots"
        packed = [k for k, kind in kinds.items() if kind == "onnx_adapter"]
        assert len(packed) == 1
        art = reg.artifact(packed[0])
        assert Path(art.path) == path.resolve()
        assert art.recipe["graph"]["artifact"] == graph_ref
        assert art.recipe["graph"]["files"]["model.onnx"]["sha256"] == env["summary"]["files"]["model.onnx"]["sha256"]
        assert art.inputs == [(env["lora_ref"], 1.0)]
        assert reg.verify().ok
    text = adapters("lineage", env["lora_ref"], home=env["home"])
    assert text.code == 0 and packed[0] in text.out and "onnx_adapter" in text.out


def test_export_refuses_bad_input_before_any_work(env):
    root = env["root"]
    res = adapters("export", "--base", env["base"], "--to", "onnx", "--slots", root / "nope", "-o", root / "x",
                   home=env["home"])
    assert res.code == 2 and res.err.startswith("error: ") and not (root / "x").exists()
    res = adapters("pack", env["lora6"], "--graph", env["base"], "-o", root / "y.onnx_adapter", home=env["home"])
    assert res.code == 2 and "export.json" in res.err
