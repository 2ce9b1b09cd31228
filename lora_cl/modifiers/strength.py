"""Projection strength schedules: fixed alpha, or alpha adapted to the overlap s_t."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SCOPES = ("global", "tensor")


class Strength:
    """Maps the per-tensor overlaps of one step to per-tensor strengths alpha.

    ``propose(names, overlaps)`` is called once per optimizer step with the overlap
    s = ||G U||^2 / ||G||^2 of every tensor that has a basis (0-d tensors, kept on the
    device: no host sync) and returns one alpha per tensor (float or 0-d tensor).

    ``device_commit`` says whether :meth:`commit` takes ``keep``, a 0-d bool tensor that the
    optimizer decided on the device (False: the step was skipped), and persists the staged
    state only where it is True without reading it on the host; then RoutedAdamW's guard needs
    no host sync. A schedule that says False is committed on the host, after the guard.
    """

    device_commit: bool = False

    def propose(self, names: list[str], overlaps: list[Tensor]) -> list[float | Tensor]:
        """This step's alphas, with the EMAs and step count staged until :meth:`commit`."""
        raise NotImplementedError

    def commit(self, keep: Tensor | None = None) -> None:
        """Persist the last :meth:`propose` (its EMAs and step count): the step was taken (or,
        with ``keep``, where the device says it was)."""

    def update(self, names: list[str], overlaps: list[Tensor]) -> list[float | Tensor]:
        """Propose and commit at once (a schedule used on its own)."""
        alphas = self.propose(names, overlaps)
        self.commit()
        return alphas

    def reset(self) -> None:
        """Start of a new domain."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedStrength(Strength):
    """alpha_t = alpha for every tensor and step (alpha = 1: hard projection)."""

    device_commit = True

    def __init__(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"FixedStrength: alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._overlap: Tensor | None = None
        self._staged: Tensor | None = None

    def propose(self, names: list[str], overlaps: list[Tensor]) -> list[float | Tensor]:
        self._staged = torch.stack(overlaps).mean() if overlaps else None
        return [self.alpha] * len(names)

    def commit(self, keep: Tensor | None = None) -> None:
        staged, self._staged = self._staged, None
        self._overlap = staged if keep is None or staged is None else _kept(keep, staged, self._overlap)

    @property
    def current_alpha(self) -> float:
        return self.alpha

    @property
    def current_overlap(self) -> float | None:
        return _read(self._overlap)

    def metrics(self) -> dict[str, float]:
        out = {"alpha": self.alpha}
        overlap = self.current_overlap
        if overlap is not None:
            out["overlap"] = overlap
        return out

    def __repr__(self) -> str:
        return f"FixedStrength(alpha={self.alpha})"


class OverlapAdaptiveStrength(Strength):
    """alpha_t = alpha_max * (1 - sbar_t), sbar_t an EMA of the overlap s_t.

    sbar_t = beta * sbar_{t-1} + (1 - beta) * s_t, reset to 0 at each domain switch;
    alpha_t = 0 during the first ``warmup`` steps of a domain. ``bias_correction=True`` (lora-cl's
    variant, not the paper's rule) uses sbar_t / (1 - beta^t), as Adam corrects its moments: the
    EMA starts at 0, so without it alpha_t sits near alpha_max for the first ~1/(1 - beta) steps
    of every domain whatever the overlap (~50 steps at beta 0.98). ``scope="global"``
    averages s_t over all tensors with a basis (the paper's rule); ``"tensor"`` keeps
    one EMA and one alpha per tensor. High overlap -> weaker attenuation, to keep
    plasticity when the new domain needs the old directions.
    """

    def __init__(self, alpha_max: float = 0.5, beta: float = 0.98, warmup: int = 0,
                 scope: str = "global", bias_correction: bool = False) -> None:
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"OverlapAdaptiveStrength: alpha_max must be in [0, 1], got {alpha_max}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"OverlapAdaptiveStrength: beta must be in [0, 1), got {beta}")
        if warmup < 0:
            raise ValueError(f"OverlapAdaptiveStrength: warmup must be >= 0, got {warmup}")
        if scope not in SCOPES:
            raise ValueError(f"OverlapAdaptiveStrength: scope must be one of {SCOPES}, got {scope!r}")
        self.alpha_max = float(alpha_max)
        self.beta = float(beta)
        self.warmup = int(warmup)
        self.scope = scope
        self.bias_correction = bool(bias_correction)
        self.steps = 0
        self.sbar: dict[str, Tensor] = {}  # "__global__" or tensor name -> EMA (0-d)
        self._last_overlap: Tensor | None = None
        self._last_alpha: Tensor | None = None
        self._staged: tuple[int, dict[str, Tensor], Tensor, Tensor] | None = None

    def _ema(self, key: str, s: Tensor, into: dict[str, Tensor]) -> Tensor:
        prev = self.sbar.get(key)
        s = s.clamp(0.0, 1.0)
        new = (1.0 - self.beta) * s if prev is None else self.beta * prev.to(s) + (1.0 - self.beta) * s
        into[key] = new
        return new

    def propose(self, names: list[str], overlaps: list[Tensor]) -> list[float | Tensor]:
        if not names:
            self._staged = None
            return []
        steps = self.steps + 1
        staged: dict[str, Tensor] = {}
        overlap = torch.stack([o.float() for o in overlaps]).mean()
        if self.scope == "global":
            sbars = [self._ema("__global__", overlap, staged)] * len(names)
        else:
            sbars = [self._ema(n, o.float(), staged) for n, o in zip(names, overlaps, strict=True)]
        if self.bias_correction:  # every tensor with a basis is seen every step of a domain
            sbars = [sb / (1.0 - self.beta**steps) for sb in sbars]
        if self.warmup and steps <= self.warmup:  # (steps is on the device after a device commit)
            alphas: list[float | Tensor] = [0.0] * len(names)
            mean_alpha = torch.zeros(())
        elif self.scope == "global":  # one alpha for every tensor: computed once
            alpha = self.alpha_max * (1.0 - sbars[0])
            alphas = [alpha] * len(names)
            mean_alpha = alpha
        else:
            alphas = [self.alpha_max * (1.0 - sb) for sb in sbars]
            mean_alpha = torch.stack([a.to(sbars[0]) for a in alphas]).mean()
        self._staged = (steps, staged, overlap, mean_alpha)
        return alphas

    @property
    def device_commit(self) -> bool:  # type: ignore[override]
        # warmup decides alpha = 0 on the host from the step count, which a masked commit keeps
        # on the device: with warmup the schedule commits after the host's guard
        return self.warmup == 0

    def commit(self, keep: Tensor | None = None) -> None:
        if self._staged is None:
            return
        steps, staged, overlap, alpha = self._staged
        self._staged = None
        if keep is None:
            self.steps, self._last_overlap, self._last_alpha = steps, overlap, alpha
            self.sbar.update(staged)
            return
        # decided on the device: the step count becomes a 0-d tensor there (read on the host
        # only by state_dict and the metrics); an EMA with no previous value keeps 0, the value
        # the EMA's recursion starts from
        self.steps = torch.where(keep, steps, torch.as_tensor(self.steps, device=keep.device))
        for key, new in staged.items():
            old = self.sbar.get(key)
            self.sbar[key] = torch.where(keep, new, torch.zeros_like(new) if old is None else old.to(new))
        self._last_overlap = _kept(keep, overlap, self._last_overlap)
        self._last_alpha = _kept(keep, torch.as_tensor(alpha, dtype=torch.float32), self._last_alpha)

    def reset(self) -> None:
        self.steps = 0
        self.sbar = {}
        self._last_overlap = None
        self._last_alpha = None
        self._staged = None

    @property
    def current_alpha(self) -> float:
        """Mean alpha of the last step (alpha_max before any step of the domain)."""
        alpha = _read(self._last_alpha)
        if alpha is None:
            return 0.0 if self.warmup > 0 else self.alpha_max
        return alpha

    @property
    def current_overlap(self) -> float | None:
        return _read(self._last_overlap)

    @property
    def smoothed_overlap(self) -> float | None:
        if not self.sbar:
            return None
        return float(torch.stack([v.cpu() for v in self.sbar.values()]).mean())

    def metrics(self) -> dict[str, float]:
        out = {"alpha": self.current_alpha}
        overlap = self.current_overlap
        if overlap is not None:
            out["overlap"] = overlap
            out["overlap_ema"] = float(self.smoothed_overlap or 0.0)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self.steps), "sbar": {k: v.detach().cpu().clone() for k, v in self.sbar.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.sbar = {k: v.clone() for k, v in state["sbar"].items()}

    def __repr__(self) -> str:
        return (f"OverlapAdaptiveStrength(alpha_max={self.alpha_max}, beta={self.beta}, "
                f"warmup={self.warmup}, scope={self.scope!r}, bias_correction={self.bias_correction})")


def _kept(keep: Tensor, new: Tensor, old: Tensor | None) -> Tensor:
    """``new`` where the device kept the step, else ``old`` (NaN standing for "none yet")."""
    new = new.to(keep.device)
    return torch.where(keep, new, torch.full_like(new, float("nan")) if old is None else old.to(new))


def _read(value: Tensor | None) -> float | None:
    """A logged 0-d value on the host (a sync: metrics only); NaN is "none yet" (see _kept)."""
    if value is None:
        return None
    value = float(value)
    return None if value != value else value


def as_strength(strength: float | Strength) -> Strength:
    """Accept a bare float as FixedStrength."""
    if isinstance(strength, Strength):
        return strength
    if isinstance(strength, (int, float)):
        return FixedStrength(float(strength))
    raise TypeError(f"strength must be a float or a Strength, got {type(strength).__name__}")
