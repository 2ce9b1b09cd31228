"""Protection leak: how much of a domain's update lies in the earlier domains' protected subspace."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from lora_cl.grouping import KINDS, tensor_kind
from lora_cl.modifiers.base import as_matrix
from lora_cl.subspace.bank import SubspaceBank


def protection_leak(deltas: Mapping[str, Tensor], bank: SubspaceBank) -> dict[str, float | None]:
    """Per tensor kind, ||P dW|| / ||dW|| over the tensors the bank protects (None: none protected).

    ``deltas``: each routed tensor's update over a domain (its end minus its start), keyed like
    the bank; P projects on the span of the bank's merged bases (input side: dW U U^T; output
    side: V V^T dW; both sides where both exist, as the projection applies them). Hard
    projection with re-projected updates gives 0; Adam's element-wise division makes it > 0 even
    with alpha = 1, since it moves a projected step back into the protected subspace.
    """
    inside = {k: 0.0 for k in KINDS}
    total = {k: 0.0 for k in KINDS}
    for name, delta in deltas.items():
        if delta.dim() < 2:
            continue
        d = as_matrix(delta.detach().double().cpu())
        rest = d
        for side in ("in", "out"):
            proj = bank.projector(name, side)
            if proj is None or proj[0].shape[1] == 0:
                continue
            U = proj[0].double()
            rest = rest - (rest @ U) @ U.T if side == "in" else rest - U @ (U.T @ rest)
        if rest is d:
            continue  # no basis: not protected, not counted
        kind = tensor_kind(name)
        total[kind] += float(d.square().sum())
        # the protected part d - rest directly (it is orthogonal to rest), not ||d||^2 - ||rest||^2:
        # that difference cancels to fp32's rounding, a floor of sqrt(eps) ~ 3e-4 under the sqrt
        inside[kind] += float((d - rest).square().sum())
    return {k: (math.sqrt(inside[k] / total[k]) if total[k] > 0 else None) for k in KINDS
            if total[k] > 0 or k != "other"}
