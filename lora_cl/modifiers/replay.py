"""Replay-gradient modifiers: mix in, or stop conflicting with, a replay-buffer gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier

REPLAY_KEY = "replay_grads"


def _replay(batch: GradBatch) -> dict[str, Tensor] | None:
    return batch.extras.get(REPLAY_KEY)


class ReplayMix(GradientModifier):
    """g~ = (1 - rho) g + rho g_r, with g_r the replay gradient supplied for this step.

    Supply it with ``optimizer.supply(replay_grads={name: tensor})`` before ``step()``;
    steps without one pass g through (counted in ``metrics()``).
    """

    def __init__(self, rho: float = 0.5) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"ReplayMix: rho must be in [0, 1], got {rho}")
        self.rho = float(rho)
        self.mixed_steps = 0
        self.unmixed_steps = 0

    def apply(self, batch: GradBatch) -> list[Tensor]:
        replay = _replay(batch)
        if not replay:
            self.unmixed_steps += 1
            return list(batch.grads)
        self.mixed_steps += 1
        out = list(batch.grads)
        for i, (name, g) in enumerate(zip(batch.names, batch.grads, strict=True)):
            g_r = replay.get(name)
            if g_r is not None:
                out[i] = (1.0 - self.rho) * g + self.rho * g_r.to(g)
        return out

    def metrics(self) -> dict[str, float]:
        return {"mixed_steps": float(self.mixed_steps), "unmixed_steps": float(self.unmixed_steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"mixed_steps": self.mixed_steps, "unmixed_steps": self.unmixed_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixed_steps = int(state["mixed_steps"])
        self.unmixed_steps = int(state["unmixed_steps"])


class AGEM(GradientModifier):
    """A-GEM: if <g, g_r> < 0 over all routed tensors, g~ = g - <g, g_r>/<g_r, g_r> g_r."""

    def __init__(self) -> None:
        self.projected_steps = 0
        self.steps = 0

    def apply(self, batch: GradBatch) -> list[Tensor]:
        replay = _replay(batch)
        if not replay:
            return list(batch.grads)
        idx = [i for i, n in enumerate(batch.names) if n in replay]
        g_r = [replay[batch.names[i]].to(batch.grads[i]) for i in idx]
        dot = sum((batch.grads[i] * r).sum() for i, r in zip(idx, g_r, strict=True))
        ref = sum(r.square().sum() for r in g_r)
        coef = torch.clamp(dot, max=0.0) / torch.clamp(ref, min=1e-30)
        self.steps += 1
        self.projected_steps += int(bool(dot < 0))
        out = list(batch.grads)
        for i, r in zip(idx, g_r, strict=True):
            out[i] = batch.grads[i] - coef * r
        return out

    def metrics(self) -> dict[str, float]:
        return {"projected_fraction": self.projected_steps / max(self.steps, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"projected_steps": self.projected_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projected_steps = int(state["projected_steps"])
        self.steps = int(state["steps"])
