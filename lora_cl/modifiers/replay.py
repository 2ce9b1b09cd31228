"""Replay-gradient modifiers: mix in, or stop conflicting with, a replay-buffer gradient."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier

REPLAY_KEY = "replay_grads"


def _replay(batch: GradBatch, owner: str) -> dict[str, Tensor] | None:
    """The supplied replay gradients, checked against the routed names (no silent no-op)."""
    replay = batch.extras.get(REPLAY_KEY)
    if not replay:
        return replay
    routed = set(batch.names)
    stray = [k for k in replay if k not in routed]
    if len(stray) == len(replay):
        raise ValueError(f"{owner}: replay_grads has {len(replay)} tensor(s) ({', '.join(stray[:3])}"
                         f", ...) but none is a routed tensor (routed: {', '.join(batch.names[:3])}, "
                         "...); key them by the optimizer's param_names")
    if stray:
        warnings.warn(f"{owner}: {len(stray)} replay gradient(s) match no routed tensor and are "
                      f"ignored: {', '.join(stray[:5])}", RuntimeWarning, stacklevel=5)
    return replay


class ReplayMix(GradientModifier):
    """g~ = (1 - rho) g + rho g_r, with g_r the replay gradient supplied for this step.

    Supply it with ``optimizer.supply(replay_grads={name: tensor})`` before ``step()``;
    steps without one pass g through (counted in ``metrics()``). Additive: under decoupled
    routing v sees max(g^2, g~^2), so a replay gradient far larger than g cannot make the
    step outgrow Adam's bound.
    """

    additive = True
    needs_names = True

    def __init__(self, rho: float = 0.5) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"ReplayMix: rho must be in [0, 1], got {rho}")
        self.rho = float(rho)
        self.mixed_steps = 0
        self.unmixed_steps = 0
        self._staged: bool | None = None

    def apply(self, batch: GradBatch) -> list[Tensor]:
        replay = _replay(batch, "ReplayMix")
        self._staged = bool(replay)
        if not replay:
            return list(batch.grads)
        out = list(batch.grads)
        for i, (name, g) in enumerate(zip(batch.names, batch.grads, strict=True)):
            g_r = replay.get(name)
            if g_r is not None:
                out[i] = (1.0 - self.rho) * g + self.rho * g_r.to(g)
        return out

    def commit(self) -> None:
        if self._staged is not None:
            self.mixed_steps += self._staged
            self.unmixed_steps += not self._staged
            self._staged = None

    def metrics(self) -> dict[str, float]:
        return {"mixed_steps": float(self.mixed_steps), "unmixed_steps": float(self.unmixed_steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"mixed_steps": self.mixed_steps, "unmixed_steps": self.unmixed_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixed_steps = int(state["mixed_steps"])
        self.unmixed_steps = int(state["unmixed_steps"])


class AGEM(GradientModifier):
    """A-GEM: if <g, g_r> < 0 over all routed tensors, g~ = g - <g, g_r>/<g_r, g_r> g_r.

    Additive (the removed component can exceed g per coordinate): under decoupled routing v
    sees max(g^2, g~^2).
    """

    additive = True
    needs_names = True

    def __init__(self) -> None:
        self.projected_steps = 0
        self.steps = 0
        self._staged: Tensor | None = None

    def apply(self, batch: GradBatch) -> list[Tensor]:
        replay = _replay(batch, "AGEM")
        self._staged = None
        if not replay:
            return list(batch.grads)
        idx = [i for i, n in enumerate(batch.names) if n in replay]
        g_r = [replay[batch.names[i]].to(batch.grads[i]) for i in idx]
        dot = sum((batch.grads[i] * r).sum() for i, r in zip(idx, g_r, strict=True))
        ref = sum(r.square().sum() for r in g_r)
        coef = torch.clamp(dot, max=0.0) / torch.clamp(ref, min=1e-30)
        self._staged = dot < 0  # read at commit, so the check costs no host sync here
        out = list(batch.grads)
        for i, r in zip(idx, g_r, strict=True):
            out[i] = batch.grads[i] - coef * r
        return out

    def commit(self) -> None:
        if self._staged is not None:
            self.steps += 1
            self.projected_steps += int(bool(self._staged))
            self._staged = None

    def metrics(self) -> dict[str, float]:
        return {"projected_fraction": self.projected_steps / max(self.steps, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"projected_steps": self.projected_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projected_steps = int(state["projected_steps"])
        self.steps = int(state["steps"])
