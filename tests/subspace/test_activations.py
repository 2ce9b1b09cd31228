"""activation_bases on a tiny peft Llama: real names, GPM energy criterion, orthogonal domains."""

from __future__ import annotations

import torch
from subspace_helpers import token_batches

from lora_cl.subspace import SubspaceBank, activation_bases


def _lora_a_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n]


def test_bases_are_real_orthonormal_and_orthogonal_across_domains(tiny_lora_llama):
    model = tiny_lora_llama
    model.train()
    bank = SubspaceBank()
    assert activation_bases(model, token_batches(2, seed=0, high=64), bank, "d1", energy=0.9) == 4
    assert sorted(bank.names("in")) == sorted(_lora_a_names(model))
    assert bank.names("out") == []
    n2 = activation_bases(model, token_batches(2, seed=1, low=64), bank, "d2", energy=0.99)
    assert n2 >= 1
    for name in bank.names():
        u1, s1 = bank.get("d1", name)
        assert u1.shape[0] == 64 and torch.equal(s1, torch.ones(u1.shape[1]))
        torch.testing.assert_close(u1.T @ u1, torch.eye(u1.shape[1]), atol=1e-5, rtol=0)
        second = bank.get("d2", name)
        if second is not None:
            assert (u1.T @ second[0]).abs().max() < 1e-4  # GPM: new directions only
    # hooks gone, train/eval flags restored
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_gpm_energy_criterion_is_met_minimally(tiny_lora_llama):
    model = tiny_lora_llama
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    name = next(n for n, p in model.named_parameters() if p is layer.lora_A["default"].weight)
    batches = token_batches(2, seed=3)
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    x = torch.cat(seen).reshape(-1, 64).float()  # 64 tokens < max_tokens: no subsampling
    bank = SubspaceBank()
    activation_bases(model, batches, bank, "d", energy=0.8)
    u, _ = bank.get("d", name)
    total = x.square().sum()
    assert (x @ u).square().sum() >= 0.8 * total * (1 - 1e-5)
    assert (x @ u[:, :-1]).square().sum() < 0.8 * total  # one fewer would miss the target
    capped = SubspaceBank()
    activation_bases(model, batches, capped, "d", energy=0.8, max_rank=2)
    assert capped.get("d", name)[0].shape[1] == min(2, u.shape[1])


def test_padding_is_ignored_and_sampling_is_deterministic(tiny_lora_llama):
    model = tiny_lora_llama
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    padded_ids = torch.cat([ids, torch.full((1, 8), 7)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 8, dtype=ids.dtype)], dim=1)
    padded = [{"input_ids": padded_ids, "attention_mask": mask}]
    banks = [SubspaceBank() for _ in range(4)]
    activation_bases(model, plain, banks[0], "d", energy=0.95)
    activation_bases(model, padded, banks[1], "d", energy=0.95)
    for name in banks[0].names():  # right padding under causal attention: same real tokens
        u0, u1 = banks[0].get("d", name)[0], banks[1].get("d", name)[0]
        assert u0.shape == u1.shape
        torch.testing.assert_close(u0 @ u0.T, u1 @ u1.T, atol=1e-4, rtol=0)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    batches = token_batches(2, seed=2)
    activation_bases(model, batches, banks[2], "d", energy=0.95, max_tokens=10, seed=4)
    activation_bases(model, batches, banks[3], "d", energy=0.95, max_tokens=10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    for name in banks[2].names():
        assert banks[2].get("d", name)[0].shape[1] <= 10
        assert torch.equal(banks[2].get("d", name)[0], banks[3].get("d", name)[0])
