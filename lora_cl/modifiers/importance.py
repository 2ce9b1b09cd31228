"""Diagonal parameter importance of earlier domains (EWC Fisher, SI path integral)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KINDS = ("fisher", "si")
COMBINES = ("sum", "max")


class Importance:
    """Per-tensor importance Omega, observed during a domain and consolidated at its end.

    ``fisher``: diagonal empirical Fisher F = mean_t g_t^2 over the steps observed in
    the domain (plus any batches given to :meth:`observe_batch`, e.g. 32 old-domain
    batches at the domain end). ``si``: Synaptic Intelligence path integral
    w = sum_t -g_t * (theta_{t+1} - theta_t), Omega = w / ((theta_end - theta_start)^2 + xi).
    Domains combine by ``sum`` (online EWC) or ``max``. :meth:`omega` returns the
    per-tensor max-normalized Omega in [0, 1]; :meth:`fisher` the raw values; the
    parameters at the last domain end are kept as anchors theta*.
    """

    def __init__(self, kind: str = "fisher", combine: str = "sum", xi: float = 1e-3) -> None:
        if kind not in KINDS:
            raise ValueError(f"Importance: kind must be one of {KINDS}, got {kind!r}")
        if combine not in COMBINES:
            raise ValueError(f"Importance: combine must be one of {COMBINES}, got {combine!r}")
        self.kind = kind
        self.combine = combine
        self.xi = float(xi)
        self.total: dict[str, Tensor] = {}     # consolidated Omega over past domains
        self.anchors: dict[str, Tensor] = {}   # theta* at the last domain end
        self._acc: dict[str, Tensor] = {}      # running sum (fisher) or path integral (si)
        self._count = 0
        self._last_step = -1
        self._prev: dict[str, tuple[Tensor, Tensor]] = {}  # si: (theta_{t-1}, g_{t-1})
        self._start: dict[str, Tensor] = {}    # si: theta at the domain start

    def observe(self, step: int, names: list[str], params: list[Tensor], grads: list[Tensor]) -> None:
        """Accumulate one step's raw gradients (a second call for the same step is ignored)."""
        if step == self._last_step:
            return
        self._last_step = step
        self._count += 1
        for name, p, g in zip(names, params, grads, strict=True):
            if self.kind == "fisher":
                self._add(name, g.square())
                continue
            theta = p.detach().float()
            if name not in self._start:
                self._start[name] = theta.clone()
            prev = self._prev.get(name)
            if prev is not None:
                self._add(name, -prev[1] * (theta - prev[0]))
            self._prev[name] = (theta.clone(), g.detach().clone())

    def observe_batch(self, named_grads: dict[str, Tensor]) -> None:
        """Add one explicit Fisher batch (squared gradients), e.g. from old-domain data."""
        if self.kind != "fisher":
            raise ValueError("Importance.observe_batch is for kind='fisher'")
        self._count += 1
        for name, g in named_grads.items():
            self._add(name, g.detach().float().square())

    def _add(self, name: str, value: Tensor) -> None:
        acc = self._acc.get(name)
        self._acc[name] = value.clone() if acc is None else acc.add_(value)

    def consolidate(self, names: list[str], params: list[Tensor]) -> None:
        """End of a domain: fold what was observed into Omega and snapshot theta*."""
        for name, p in zip(names, params, strict=True):
            theta = p.detach().float()
            acc = self._acc.get(name)
            if acc is not None:
                if self.kind == "fisher":
                    new = acc / max(self._count, 1)
                else:
                    if name in self._prev:  # the last step's contribution
                        prev_theta, prev_g = self._prev[name]
                        acc = acc - prev_g * (theta - prev_theta)
                    new = (acc / ((theta - self._start[name]).square() + self.xi)).clamp_min(0.0)
                old = self.total.get(name)
                if old is None:
                    self.total[name] = new
                else:
                    self.total[name] = old + new if self.combine == "sum" else torch.maximum(old, new)
            self.anchors[name] = theta.clone()
        self._acc, self._prev, self._start = {}, {}, {}
        self._count = 0

    def omega(self, name: str) -> Tensor | None:
        """Omega / max(Omega) for one tensor (None before any domain is consolidated)."""
        value = self.total.get(name)
        if value is None:
            return None
        return value / value.max().clamp_min(1e-30)

    def fisher(self, name: str) -> Tensor | None:
        return self.total.get(name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "combine": self.combine, "xi": self.xi,
            "total": dict(self.total), "anchors": dict(self.anchors), "acc": dict(self._acc),
            "count": self._count, "last_step": self._last_step,
            "prev_theta": {k: v[0] for k, v in self._prev.items()},
            "prev_grad": {k: v[1] for k, v in self._prev.items()},
            "start": dict(self._start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"Importance: checkpoint kind {state['kind']!r} != {self.kind!r}")
        self.combine, self.xi = state["combine"], float(state["xi"])
        self.total = {k: v.clone() for k, v in state["total"].items()}
        self.anchors = {k: v.clone() for k, v in state["anchors"].items()}
        self._acc = {k: v.clone() for k, v in state["acc"].items()}
        self._count, self._last_step = int(state["count"]), int(state["last_step"])
        self._prev = {k: (state["prev_theta"][k].clone(), state["prev_grad"][k].clone())
                      for k in state["prev_theta"]}
        self._start = {k: v.clone() for k, v in state["start"].items()}


def as_importance(importance: Importance | str) -> Importance:
    return importance if isinstance(importance, Importance) else Importance(kind=importance)
