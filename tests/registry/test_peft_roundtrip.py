"""A PEFT-saved LoRA survives push -> pull byte for byte and loads back into PEFT with the
same outputs; a pulled MoRA folder is still the paper fork's format (use_mora, two copies)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_peft_lora_roundtrip(reg, tmp_path):
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    v = reg.push(tmp_path / "saved", "tiny/lora", base_model="tiny-llama")
    info = reg.resolve(v.ref)
    assert info.kind == "lora" and info.r == 4 and len(info.spec["modules"]) == 4
    out = reg.pull(v.ref, tmp_path / "pulled")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / f).read_bytes() == (tmp_path / "saved" / f).read_bytes()
    loaded = peft.PeftModel.from_pretrained(_tiny_llama(), str(out)).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pulled_mora_keeps_fork_format(reg, make_adapter, tmp_path):
    from mora_core.adapter import load_adapter

    v = reg.push(make_adapter("m", kind="mora", r=8, mora_type=1), "team/mora")
    out = reg.pull(v.ref, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_mora"] is True  # upstream PEFT would call this LoRA
    assert reg.resolve(v.ref).kind == "mora"
    assert load_adapter(out).kind == "mora"
