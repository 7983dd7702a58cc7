"""An adapter saved by PEFT merges here to exactly what PEFT's merge_and_unload gives,
and mora_core's unmerged forward gives PEFT's unmerged outputs (real peft, real models)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers

from exporters.safetensors_out import merge_folder
from mora_core.adapter import load_adapter
from mora_core.forward import apply_unmerged
from tests.builders import read_folder

warnings.filterwarnings("ignore")


def llama(tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


CASES = {
    "llama-lora": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora-patterns": (llama, dict(r=4, lora_alpha=8, use_rslora=True,
                                          target_modules=["q_proj", "k_proj", "up_proj", "o_proj"],
                                          rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6},
                                          alpha_pattern={"o_proj": 3})),
    "llama-dora": (llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"])),
    "llama-embedding-and-modules-to-save": (
        lambda: llama(tie=False),
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d": (gpt2, dict(r=4, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_fc", "c_proj"])),
    "gpt2-dora": (gpt2, dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn"])),
}


def _perturb_trainables(model: torch.nn.Module) -> None:
    # init_lora_weights=False randomises A and B; also move DoRA magnitudes and saved modules
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(case, tmp_path):
    make, lora_kwargs = CASES[case]
    torch.manual_seed(0)
    model = make()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    _perturb_trainables(pm)
    adapter_dir = tmp_path / "adapter"
    pm.save_pretrained(adapter_dir)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        peft_unmerged = pm(ids).logits
    adapter = load_adapter(adapter_dir)

    # unmerged forward here vs PEFT's unmerged forward
    fresh = make()
    fresh.load_state_dict(read_folder(base_dir), strict=False)
    with apply_unmerged(fresh, [adapter]), torch.no_grad():
        ours_unmerged = fresh(ids).logits
    torch.testing.assert_close(ours_unmerged, peft_unmerged, atol=1e-5, rtol=1e-5)

    # merged weights here vs PEFT's merge_and_unload (same float32 math)
    expected = pm.merge_and_unload().state_dict()
    report = merge_folder(base_dir, [adapter], tmp_path / "merged")
    got = read_folder(tmp_path / "merged")
    assert report.tensors_merged >= 1
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-6, rtol=1e-5, msg=name)
    changed = [n for n in got if not torch.equal(got[n], read_folder(base_dir)[n])]
    assert changed, "the adapter changed nothing: the test would not catch a no-op merge"


def test_mora_on_gpt2_conv1d_is_merged_in_the_right_layout(tmp_path):
    """The paper's code ignores fan_in_fan_out; here MoRA on Conv1D merges to its forward."""
    from tests.builders import write_mora_adapter

    torch.manual_seed(0)
    model = gpt2()
    model.save_pretrained(tmp_path / "base")
    shapes = {f"transformer.h.{i}.attn.c_attn": (32, 96) for i in range(2)}
    shapes.update({f"transformer.h.{i}.mlp.c_fc": (32, 128) for i in range(2)})
    for mora_type in (1, 6):
        adir = tmp_path / f"mora{mora_type}"
        write_mora_adapter(adir, shapes, r=8, mora_type=mora_type, fan_in_fan_out=True, scale=0.05)
        adapter = load_adapter(adir)
        ids = torch.randint(0, 96, (2, 7))
        with apply_unmerged(model, [adapter]), torch.no_grad():
            reference = model(ids).logits
        merge_folder(tmp_path / "base", [adapter], tmp_path / f"out{mora_type}")
        merged = gpt2()
        merged.load_state_dict(read_folder(tmp_path / f"out{mora_type}"), strict=False)
        with torch.no_grad():
            got = merged(ids).logits
            plain = model(ids).logits
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-3
