"""adapter_bases on a tiny peft Llama: dW = scaling * B A row/column spaces, fresh LoRA skipped."""

from __future__ import annotations

import pytest
import torch
from subspace_helpers import projection

from lora_cl.subspace import SubspaceBank, adapter_bases


def _lora_pairs(model):
    params = dict(model.named_parameters())
    for a_name in [n for n in params if ".lora_A." in n]:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        yield a_name, b_name, params[a_name], params[b_name]


def test_fresh_adapter_has_no_bases(tiny_lora_llama):
    bank = SubspaceBank()
    assert adapter_bases(tiny_lora_llama, bank, "d") == 0 and bank.domains() == []


def test_bases_span_row_and_column_space_of_update(tiny_lora_llama):
    model = tiny_lora_llama
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, _, b in _lora_pairs(model):
            b.copy_(torch.randn(b.shape, generator=g))
    bank = SubspaceBank()
    assert adapter_bases(model, bank, "d", rank=4) == 8  # 4 layers x (in, out)
    scaling = 8 / 4
    for a_name, b_name, a, b in _lora_pairs(model):
        dw = scaling * b.detach() @ a.detach()
        v, s = bank.get("d", a_name, "in")
        u, s_out = bank.get("d", b_name, "out")
        assert v.shape == (64, 4) and u.shape[1] == 4 and not bank.has(a_name, "out")
        torch.testing.assert_close(v.T @ v, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(dw @ projection(v), dw, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(projection(u) @ dw, dw, atol=1e-4, rtol=1e-4)
        sv = torch.linalg.svdvals(dw)[:4]
        torch.testing.assert_close(s, sv / sv[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(s, s_out)
    energy_bank = SubspaceBank()
    adapter_bases(model, energy_bank, "d", energy=0.5)
    assert all(energy_bank.get("d", n)[0].shape[1] < 4 for n in energy_bank.names("in"))


def test_unknown_adapter_names_present_ones(tiny_lora_llama):
    with pytest.raises(ValueError, match="adapters present: \\['default'\\]"):
        adapter_bases(tiny_lora_llama, SubspaceBank(), "d", adapter_name="other")
