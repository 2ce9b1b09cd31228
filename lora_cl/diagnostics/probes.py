"""Probes of the attenuate-then-adapt conflict, read from gradients and Adam states.

For an old-domain basis U (fan_in x k, orthonormal columns), a gradient G (rows x fan_in)
and Adam's second moment v (same shape as G, bias-corrected v^ = v / (1 - b2^t)):

* overlap           s = ||G U||^2 / ||G||^2
* v energy in U     E_U(v) = mean_rows sum_i v^_ri (U U^T)_ii
* old-direction LR  eta_U = mean_rows mean_{u in U} sum_i u_i^2 * lr / (sqrt(v^_ri) + eps),
  the Rayleigh quotient of Adam's diagonal preconditioner along each protected direction.

Proposition 1 compares two routings on the same gradient stream: with projection strength
alpha, eta_U(shared) / eta_U(decoupled) -> 1/(1-alpha) and E_U(decoupled) / E_U(shared)
-> 1/(1-alpha)^2 when the protected directions are coordinate directions and eps << sqrt(v).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def overlap(grad: Tensor, U: Tensor) -> float:
    """s = ||G U||^2 / ||G||^2 on the fan-in side."""
    G = grad.reshape(grad.shape[0], -1).float()
    return float((G @ U).square().sum() / G.square().sum().clamp_min(1e-30))


def _bias_corrected_v(v: Tensor, step: float, beta2: float) -> Tensor:
    return v.reshape(v.shape[0], -1).float() / (1 - beta2**step)


def v_energy_in_subspace(v: Tensor, U: Tensor, step: float, beta2: float) -> float:
    """E_U(v): second-moment energy along U (diagonal of U U^T weighted by v^), mean over rows."""
    diag = U.square().sum(dim=1)
    return float((_bias_corrected_v(v, step, beta2) * diag).sum(dim=1).mean())


def v_share_in_subspace(v: Tensor, U: Tensor, step: float, beta2: float) -> float:
    """E_U(v) / total v energy: the share of v that lies along the old subspace."""
    vh = _bias_corrected_v(v, step, beta2)
    return float((vh * U.square().sum(dim=1)).sum() / vh.sum().clamp_min(1e-30))


def old_direction_lr(v: Tensor, U: Tensor, step: float, lr: float, beta2: float,
                     eps: float) -> float:
    """eta_U: Adam's effective learning rate along the protected directions (mean)."""
    inv = lr / (_bias_corrected_v(v, step, beta2).sqrt() + eps)   # rows x fan_in
    return float((inv @ U.square()).mean())


#: The probes' keys per side: "in" (the fan-in side, lora_A's) keeps the original names.
PROBE_KEYS = {"in": ("probe/v_share_old", "probe/old_direction_lr", "probe/v_energy_old"),
              "out": ("probe/v_share_old_out", "probe/old_direction_lr_out", "probe/v_energy_old_out")}


def optimizer_probes(optimizer: Any, bank: Any, sides: tuple[str, ...] = ("in", "out")) -> dict[str, float]:
    """Mean of the probes over every routed tensor of ``optimizer`` with a basis in ``bank``, per side.

    Side "in" (a basis on the fan-in dimension, LoRA A's) gives ``probe/v_share_old``,
    ``probe/old_direction_lr`` and ``probe/v_energy_old`` (E_U(v): two routings' ratio of it is
    Proposition 1's R_v); side "out" (a basis on the fan-out dimension, LoRA B's when both factors
    are protected) the same probes of the transposed v under ``..._out`` keys. A side no tensor
    has a basis for gives no keys.
    """
    names, params = optimizer.routed_named_params()
    group = optimizer.param_groups[0]
    beta2, eps, lr = group["betas"][1], group["eps"], float(group["lr"])
    found: dict[str, tuple[list[float], list[float], list[float]]] = {side: ([], [], []) for side in sides}
    for name, p in zip(names, params, strict=True):
        state = optimizer.state.get(p)
        if p.ndim < 2 or not state:
            continue
        bases = {side: proj[0] for side in sides
                 if (proj := bank.projector(name, side, device=p.device)) is not None and proj[0].shape[1]}
        # (the same tensors on every rank, in order: FSDP2 gathers the moments once per tensor)
        moments = optimizer.moments(p) if bases else None
        if moments is None:
            continue
        v = moments[1]  # (8-bit states come back dequantized, FSDP2 shards whole)
        step, v = float(state["step"]), v.reshape(v.shape[0], -1)
        for side, U in bases.items():
            vs = v if side == "in" else v.T
            shares, lrs, energies = found[side]
            shares.append(v_share_in_subspace(vs, U, step, beta2))
            lrs.append(old_direction_lr(vs, U, step, lr, beta2, eps))
            energies.append(v_energy_in_subspace(vs, U, step, beta2))
    return {key: sum(vals) / len(vals) for side, lists in found.items() if lists[0]
            for key, vals in zip(PROBE_KEYS[side], lists, strict=True)}
