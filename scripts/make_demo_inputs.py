"""Inputs for the README demo: a small Llama-like base and two adapters with non-zero weights.

- base/: a transformers LlamaForCausalLM (random weights, small config) saved as safetensors;
- mora/: a MoRA adapter (type 6, r=8) on q/k/v/o and the MLP, in the paper's peft-fork format;
- lora/: a LoRA adapter made with real peft (init_lora_weights=False, so B is non-zero).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from mora_core.mora import mora_rank


def main(work: Path) -> None:
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(work / "base")

    # MoRA, as the paper's peft fork saves it: two identical r_hat x r_hat copies per module
    r, mora_type = 8, 6
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            rh = mora_rank(module.in_features, module.out_features, r, mora_type)
            m = torch.randn(rh, rh) * 0.02
            tensors[f"base_model.model.{name}.lora_A.weight"] = m
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.clone()
    (work / "mora").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(work / "mora" / "adapter_model.safetensors"))
    (work / "mora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_mora": True, "mora_type": mora_type, "r": r, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM"}, indent=2))

    lora = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                               peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    lora.save_pretrained(work / "lora")
    print(f"demo inputs in {work}: base/ ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          "mora/ (type 6, r=8), lora/ (r=16)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
