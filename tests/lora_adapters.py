"""Tiny PEFT LoRA adapters for the tests, built with PEFT itself on the tiny checkpoints.

``build_adapter(tmp_path, base_dir, seed=1, r=8, ...)`` saves one (random, non-zero A and B,
so it changes the model's outputs) and returns its directory.
"""

from __future__ import annotations

import tempfile

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(tmp_path, base_dir: str, seed: int = 1, r: int = 8, lora_alpha: float = 16,
                  target_modules=None, use_rslora: bool = False, scale: float = 0.3) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules or ALL_TARGETS,
                        lora_dropout=0.0, use_rslora=use_rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, scale / param.shape[-1] ** 0.5)
    path = tempfile.mkdtemp(prefix=f"lora-{seed}-", dir=str(tmp_path))
    peft_model.save_pretrained(path)
    return path


def peft_greedy(base_dir: str, adapter_dir: str | None, prompt_ids: list[int],
                max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers (+ PEFT when ``adapter_dir``), fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()
