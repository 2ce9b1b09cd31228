"""Importance rescaling (penalty-style): shrink the gradient where old domains care."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier
from lora_cl.modifiers.importance import Importance, as_importance


class ImportanceRescale(GradientModifier):
    """g~ = g * clamp(1 - lam * Omega, 0, 1), Omega the max-normalized importance of past domains.

    ``importance`` is an :class:`Importance` (or its kind, ``"fisher"``/``"si"``); this
    modifier feeds it the raw gradients and consolidates it at each domain end.
    """

    def __init__(self, importance: Importance | str = "fisher", lam: float = 0.5) -> None:
        if lam < 0:
            raise ValueError(f"ImportanceRescale: lam must be >= 0, got {lam}")
        self.importance = as_importance(importance)
        self.lam = float(lam)

    def apply(self, batch: GradBatch) -> list[Tensor]:
        self.importance.observe(batch.step, batch.names, batch.params, batch.raw)
        out = list(batch.grads)
        for i, (name, g) in enumerate(zip(batch.names, batch.grads, strict=True)):
            omega = self.importance.omega(name)
            if omega is not None and self.lam != 0.0:
                out[i] = g * (1.0 - self.lam * omega.to(g)).clamp(0.0, 1.0)
        return out

    def on_domain_end(self, domain: str, names: list[str], params: list[Tensor]) -> None:
        self.importance.consolidate(names, params)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state["importance"])


class EWCPenalty(GradientModifier):
    """g~ = g + lam * F * (theta - theta*): the classic EWC penalty gradient.

    F is the (unnormalized, summed over domains) diagonal Fisher and theta* the
    parameters at the end of the last domain.
    """

    def __init__(self, lam: float = 1.0, importance: Importance | str = "fisher") -> None:
        if lam < 0:
            raise ValueError(f"EWCPenalty: lam must be >= 0, got {lam}")
        self.importance = as_importance(importance)
        self.lam = float(lam)

    def apply(self, batch: GradBatch) -> list[Tensor]:
        self.importance.observe(batch.step, batch.names, batch.params, batch.raw)
        out = list(batch.grads)
        for i, (name, p, g) in enumerate(zip(batch.names, batch.params, batch.grads, strict=True)):
            fisher = self.importance.fisher(name)
            anchor = self.importance.anchors.get(name)
            if fisher is not None and anchor is not None and self.lam != 0.0:
                out[i] = g + self.lam * fisher.to(g) * (p.detach().float() - anchor.to(g))
        return out

    def on_domain_end(self, domain: str, names: list[str], params: list[Tensor]) -> None:
        self.importance.consolidate(names, params)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state["importance"])
