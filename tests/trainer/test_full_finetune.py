"""route="linear": full finetuning of a plain (non-peft) model, every linear weight routed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trainer_helpers import DOMAINS, lora_model, run_domain

import lora_cl
from lora_cl.grouping import linear_weight_names, param_groups


def _plain(tiny_factory):
    model, tokenizer = tiny_factory()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


def test_linear_route_takes_every_linear_weight_and_leaves_the_rest_vanilla(tiny_factory):
    model, _ = _plain(tiny_factory)
    routed, vanilla = param_groups(model, route="linear", routing="shared")
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # the tiny Llama ties its LM head to the embedding: that one tensor is routed, under its
    # first name; the 2 x 7 projections (q, k, v, o, gate, up, down) are the rest
    assert model.config.tie_word_embeddings and "lm_head" in linear
    expected = {f"{n}.weight" for n in linear if n != "lm_head"} | {"model.embed_tokens.weight"}
    assert set(routed["param_names"]) == expected == linear_weight_names(model)
    assert len(routed["params"]) == 2 * 7 + 1 and routed["routing"] == "shared"
    assert all(p.dim() == 2 for p in routed["params"])
    assert vanilla["routing"] == "vanilla" and all("norm" in n for n in vanilla["param_names"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(routed["param_names"]) | set(vanilla["param_names"])


def test_route_is_checked(tiny_factory):
    model, _ = tiny_factory()
    with pytest.raises(ValueError, match=r"route must be one of \('lora', 'linear'\), got 'all'"):
        param_groups(model, route="all")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="route='linear' found no trainable weight.*requires_grad=True"):
        param_groups(model, route="linear")
    peft_model, _ = lora_model(tiny_factory)
    with pytest.raises(ValueError, match="is a peft LoRA factor; use route='lora'"):
        param_groups(peft_model, route="linear")


def test_full_finetune_stream_projects_every_linear_weight(tiny_factory, tmp_path):
    """Two domains through the real Trainer: domain 1 leaves an input-side gradient basis for each
    linear weight whose fan-in exceeds the rank cap, and domain 2's steps project all of them."""
    model, tokenizer = _plain(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp-in", route="linear", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_domain(model, tokenizer, optimizer, callback, "cooking", DOMAINS["cooking"], tmp_path)
    bank = optimizer.bank
    routed = optimizer.param_groups[0]["param_names"]
    wide = {n for n, p in model.named_parameters() if n in routed and p.shape[1] > 32}
    assert set(bank.names("in")) == wide and not bank.names("out")
    assert len(wide) == len(routed)  # hidden 64, MLP 128: every fan-in is above 32
    trainer = run_domain(model, tokenizer, optimizer, callback, "law", DOMAINS["law"], tmp_path)
    logs = [h for h in trainer.state.log_history if "projection/projected_tensors" in h]
    assert logs and all(h["projection/projected_tensors"] == len(wide) for h in logs)
    # full finetuning: every trainable tensor moved, routed and vanilla alike
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert set(callback.snapshots["law"]) == set(routed)
