"""Importance-based modifiers: rescaling (penalty-style) and the EWC penalty gradient."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier
from lora_cl.modifiers.importance import Importance, as_importance


class _ImportanceModifier(GradientModifier):
    """Feeds an :class:`Importance` the raw gradients and consolidates it at domain ends."""

    def __init__(self, importance: Importance | str, lam: float) -> None:
        if lam < 0:
            raise ValueError(f"{type(self).__name__}: lam must be >= 0, got {lam}")
        self.importance = as_importance(importance)
        self.lam = float(lam)

    def apply(self, batch: GradBatch) -> list[Tensor]:
        # observed at commit(): a skipped step adds nothing to the importance
        self._staged = (batch.step, batch.names, batch.params, batch.raw)
        out = list(batch.grads)
        if self.lam == 0.0:
            return out
        for i, (name, p, g) in enumerate(zip(batch.names, batch.params, batch.grads, strict=True)):
            modified = self.modify(name, p, g)
            if modified is not None:
                out[i] = modified
        return out

    def commit(self) -> None:
        staged, self._staged = getattr(self, "_staged", None), None
        if staged is not None:
            self.importance.observe(*staged)

    def modify(self, name: str, param: Tensor, grad: Tensor) -> Tensor | None:
        raise NotImplementedError

    def on_domain_end(self, domain: str, names: list[str], params: list[Tensor]) -> None:
        self.importance.consolidate(names, params)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state["importance"])


class ImportanceRescale(_ImportanceModifier):
    """g~ = g * clamp(1 - lam * Omega, 0, 1), Omega the max-normalized importance of past domains.

    ``importance`` is an :class:`Importance` (or its kind, ``"fisher"``/``"si"``); this
    modifier feeds it the raw gradients and consolidates it at each domain end.
    """

    def __init__(self, importance: Importance | str = "fisher", lam: float = 0.5) -> None:
        super().__init__(importance, lam)

    def modify(self, name: str, param: Tensor, grad: Tensor) -> Tensor | None:
        omega = self.importance.omega(name)
        if omega is None:
            return None
        return grad * (1.0 - self.lam * omega.to(grad)).clamp(0.0, 1.0)


class EWCPenalty(_ImportanceModifier):
    """g~ = g + lam * F * (theta - theta*): the classic EWC penalty gradient.

    F is the (unnormalized, summed over domains) diagonal Fisher and theta* the
    parameters at the end of the last domain. Additive: under decoupled routing v sees
    max(g^2, g~^2), so a large penalty term cannot make the step outgrow Adam's bound.
    """

    additive = True

    def __init__(self, lam: float = 1.0, importance: Importance | str = "fisher") -> None:
        super().__init__(importance, lam)

    def modify(self, name: str, param: Tensor, grad: Tensor) -> Tensor | None:
        fisher = self.importance.fisher(name)
        anchor = self.importance.anchors.get(name)
        if fisher is None or anchor is None:
            return None
        return grad + self.lam * fisher.to(grad) * (param.detach().float() - anchor.to(grad))
