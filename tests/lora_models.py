"""Tiny models and PEFT adapters for the LoRA tests (no network: models are built from configs).

``make_adapter`` trains nothing: it makes a LoRA model with ``init_lora_weights=False``
(B random, not zero, so every delta is nonzero), optionally changes a
``modules_to_save`` copy, saves the adapter, and returns PEFT's own merge.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_llama(path: str, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_gpt2(path: str, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def load_base(path: str):
    from transformers import AutoModel, AutoModelForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        encoder = json.load(f).get("model_type") == "bert"  # MiniLM: the bare encoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(path, local_files_only=True)


def peft_model(base_path: str, seed: int, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(load_base(base_path), LoraConfig(init_lora_weights=False, **config))


def change_saved_modules(model, seed: int) -> None:
    """Move every modules_to_save copy away from the base (training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def make_adapter(base_path: str, out: str, seed: int = 1, **config) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter of the model at ``base_path`` to ``out``; return PEFT's merged state dict."""
    model = peft_model(base_path, seed, **config)
    change_saved_modules(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
