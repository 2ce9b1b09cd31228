"""Adapter bases: the row and column spaces of each domain's learned update dW = scaling * B A."""

from __future__ import annotations

import torch
from torch import nn

from lora_cl.subspace._peft import lora_linears
from lora_cl.subspace.bank import SubspaceBank
from lora_cl.subspace.builders import resolve_rule, select_rank

DEFAULT_ENERGY = 0.99


@torch.no_grad()
def adapter_bases(model: nn.Module, bank: SubspaceBank, domain: str, *,
                  adapter_name: str = "default", rank: int | None = None,
                  energy: float | None = None) -> int:
    """Add each LoRA layer's dW = U S V^T bases to ``bank``; return how many bases were added.

    dW = scaling * B A (d_out x d_in); V[:, :k] becomes the side "in" basis of the lora_A
    weight and U[:, :k] the side "out" basis of the lora_B weight, weights S[:k] / S_max.
    k by ``rank`` or ``energy`` (neither: energy 0.99). Computed without forming dW:
    B = Q_b R_b, A^T = Q_a R_a, scaling R_b R_a^T = U_c S V_c^T, U = Q_b U_c, V = Q_a V_c.
    Layers with dW = 0 (e.g. a fresh LoRA, whose B is zero) are skipped.
    """
    rank, energy = resolve_rule(rank, energy, None, DEFAULT_ENERGY)
    added = 0
    for m in lora_linears(model, adapter_name):
        a, b = m.A.detach().double(), m.B.detach().double()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.mT)
        uc, sigma, vch = torch.linalg.svd(m.scaling * rb @ ra.mT, full_matrices=False)
        k = select_rank(sigma, rank=rank, energy=energy)
        if k == 0:
            continue
        u = (qb @ uc[:, :k]).float().cpu()
        v = (qa @ vch[:k].mT).float().cpu()
        s = (sigma[:k] / sigma[0]).float().cpu()
        bank.add(domain, m.a_name, v, s, side="in")
        bank.add(domain, m.b_name, u, s, side="out")
        added += 2
    return added
