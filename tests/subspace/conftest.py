"""Fixtures for the subspace tests: a tiny random peft Llama (nothing downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_lora_llama():
    """A 2-layer random Llama (hidden 64) with LoRA r=4 on q_proj and v_proj; nothing downloads."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
        return peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
