"""The gradient-modifier protocol: small transformations g -> g~, chained in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class GradBatch:
    """Everything a modifier sees for one optimizer step (routed tensors only).

    ``grads`` holds the gradient as modified by the modifiers earlier in the chain;
    ``raw`` is the untouched loss gradient g. Both are fp32 and must never be
    modified in place: a modifier that changes gradient i returns a new tensor at
    position i and returns the incoming tensor object unchanged otherwise (the
    optimizer uses ``out[i] is raw[i]`` to know that g~ = g exactly).
    """

    names: list[str]
    params: list[Tensor]
    grads: list[Tensor]
    raw: list[Tensor]
    step: int
    extras: dict[str, Any] = field(default_factory=dict)


class GradientModifier:
    """Base class: maps a :class:`GradBatch` to the list of modified gradients g~.

    Subclasses override :meth:`apply`; the domain hooks, ``state_dict`` and
    ``metrics`` are optional. A modifier never sees or touches optimizer state.
    """

    def apply(self, batch: GradBatch) -> list[Tensor]:
        raise NotImplementedError

    def __call__(self, batch: GradBatch) -> list[Tensor]:
        return self.apply(batch)

    def on_domain_start(self, domain: str) -> None:
        """Called when training on ``domain`` begins (reset per-domain statistics)."""

    def on_domain_end(self, domain: str, names: list[str], params: list[Tensor]) -> None:
        """Called when training on ``domain`` ends (consolidate what was observed)."""

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging (read lazily: may synchronise the device)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")


def unchanged(batch: GradBatch) -> list[Tensor]:
    """The identity result (same tensor objects), for modifiers that only observe."""
    return list(batch.grads)


def as_matrix(t: Tensor) -> Tensor:
    """View a >=2-D tensor as (rows, fan_in): the last dim is the fan-in side."""
    return t.reshape(-1, t.shape[-1])
