"""LoRA-only routing: peft LoRA tensors routed, every other trainable tensor vanilla."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_cl import RoutedAdamW, is_lora_name, param_groups


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_lora_tensors_routed_modules_to_save_vanilla():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]))
    groups = param_groups(model, routing="decoupled", lr=1e-3)
    routed, vanilla = groups
    assert routed["routing"] == "decoupled" and vanilla["routing"] == "vanilla"
    assert len(routed["params"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in routed["param_names"])
    assert any("lm_head" in n for n in vanilla["param_names"])
    assert routed["lr"] == 1e-3 and "lr" not in vanilla
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(routed["param_names"]) | set(vanilla["param_names"])
    opt = RoutedAdamW(groups)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.routed_named_params()[0] == routed["param_names"]


def test_embedding_lora_is_routed():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    (routed,) = param_groups(model)
    assert any("lora_embedding_A" in n for n in routed["param_names"])
    assert any("lora_embedding_B" in n for n in routed["param_names"])


def test_no_lora_is_a_clear_error():
    with pytest.raises(ValueError, match="get_peft_model"):
        param_groups(tiny_llama())


@pytest.mark.parametrize("name,expected", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", True),
    ("base_model.model.model.embed_tokens.lora_embedding_B.default", True),
    ("base_model.model.lm_head.modules_to_save.default.weight", False),
    ("model.layers.0.mlp.flora_A.weight", False),
])
def test_is_lora_name(name, expected):
    assert is_lora_name(name) is expected
