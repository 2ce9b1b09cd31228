"""Subspace projection: remove (part of) the gradient that lies in old domains' bases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier
from lora_cl.modifiers.strength import Strength, as_strength

if TYPE_CHECKING:
    from lora_cl.subspace.bank import SubspaceBank

SIDES = ("in", "out", "both")


class Projection(GradientModifier):
    """g~ = g - alpha * G U diag(s) U^T (fan-in side) and/or g - alpha * V diag(s) V^T G.

    ``side="in"`` acts on the last (fan-in) dimension — for a peft LoRA A weight
    (r x d_in) that is the module's input space; ``side="out"`` on the first (fan-out)
    dimension — LoRA B (d_out x r); ``"both"`` applies both where the bank holds
    bases. ``weighted=False`` ignores the singular-value weights s (s = 1), so
    ``Projection(bank, 1.0, weighted=False)`` is hard projection (GPM/InfLoRA-like).
    1-D tensors and tensors without a basis pass through untouched.

    The overlap s = ||G U||^2 / ||G||^2 of each tensor (mean over its sides) feeds the
    ``strength`` schedule, which returns alpha per tensor.
    """

    def __init__(self, bank: SubspaceBank, strength: float | Strength = 1.0,
                 weighted: bool = True, side: str = "in") -> None:
        if side not in SIDES:
            raise ValueError(f"Projection: side must be one of {SIDES}, got {side!r}")
        self.bank = bank
        self.strength = as_strength(strength)
        self.weighted = weighted
        self.side = side
        self._sides = ("in", "out") if side == "both" else (side,)
        self._last_alphas: dict[str, float | Tensor] = {}

    def _bases(self, name: str, g: Tensor) -> list[tuple[str, Tensor, Tensor]]:
        if g.ndim < 2:
            return []
        out = []
        for side in self._sides:
            proj = self.bank.projector(name, side, device=g.device, dtype=torch.float32)
            if proj is None or proj[0].shape[1] == 0:
                continue
            dim = g.shape[-1] if side == "in" else g.shape[0]
            if proj[0].shape[0] != dim:
                raise ValueError(
                    f"Projection: basis for {name!r} (side {side!r}) has dimension "
                    f"{proj[0].shape[0]} but the tensor's {side}-dimension is {dim}; "
                    "was the bank built for another model or LoRA rank?"
                )
            out.append((side, proj[0], proj[1]))
        return out

    def _component(self, g: Tensor, side: str, U: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """The (weighted) component of g in span(U) and the overlap ||G U||^2/||G||^2."""
        if side == "in":
            G = g.reshape(-1, g.shape[-1])
            coords = G @ U
            comp = (coords * s if self.weighted else coords) @ U.T
        else:
            G = g.reshape(g.shape[0], -1)
            coords = U.T @ G
            comp = U @ (coords * s[:, None] if self.weighted else coords)
        overlap = coords.square().sum() / G.square().sum().clamp_min(1e-30)
        return comp.reshape(g.shape), overlap

    def apply(self, batch: GradBatch) -> list[Tensor]:
        out = list(batch.grads)
        found: list[tuple[int, list[tuple[str, Tensor, Tensor]], Tensor]] = []
        overlaps: list[Tensor] = []
        for i, (name, g) in enumerate(zip(batch.names, batch.grads, strict=True)):
            bases = self._bases(name, g)
            if not bases:
                continue
            first, overlap = self._component(g, *bases[0])
            side_overlaps = [overlap] + [self._component(g, *b)[1] for b in bases[1:]]
            overlaps.append(torch.stack(side_overlaps).mean())
            found.append((i, bases, first))
        names = [batch.names[i] for i, _, _ in found]
        alphas = self.strength.update(names, overlaps)
        self._last_alphas = dict(zip(names, alphas, strict=True))
        for (i, bases, first), alpha in zip(found, alphas, strict=True):
            if _is_zero(alpha):
                continue  # out[i] stays the incoming tensor object: g~ = g exactly
            g = batch.grads[i] - alpha * first
            # side="both": the out-side component is taken of the in-projected gradient,
            # so alpha = 1 removes the union of both subspaces exactly.
            for base in bases[1:]:
                g = g - alpha * self._component(g, *base)[0]
            out[i] = g
        return out

    def project_update(self, names: list[str], deltas: list[Tensor]) -> list[Tensor]:
        """Re-project a final parameter update with each tensor's alpha of the last step."""
        out = list(deltas)
        for i, name in enumerate(names):
            alpha = self._last_alphas.get(name, 0.0)
            if _is_zero(alpha):
                continue
            for base in self._bases(name, out[i]):
                out[i] = out[i] - alpha * self._component(out[i], *base)[0]
        return out

    def on_domain_start(self, domain: str) -> None:
        self.strength.reset()

    def metrics(self) -> dict[str, float]:
        return self.strength.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "strength": self.strength.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.strength.load_state_dict(state["strength"])

    def __repr__(self) -> str:
        return (f"Projection(strength={self.strength!r}, weighted={self.weighted}, "
                f"side={self.side!r})")


def _is_zero(alpha: float | Tensor) -> bool:
    # A 0-d tensor alpha is never compared (that would sync the device).
    return isinstance(alpha, (int, float)) and alpha == 0.0
