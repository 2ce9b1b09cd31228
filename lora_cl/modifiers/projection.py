"""Subspace projection: remove (part of) the gradient that lies in old domains' bases."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier, as_matrix, fan_in
from lora_cl.modifiers.strength import Strength, as_strength

if TYPE_CHECKING:
    from lora_cl.subspace.bank import SubspaceBank

SIDES = ("in", "out", "both")
#: Working-set size of one batched chunk on a CPU (measured on a 32 MiB L3: 16 MiB chunks ran
#: fastest).
CHUNK_BYTES = 16 * 2**20
#: ... and on an accelerator, where each chunk's ~16 ops are kernel launches and no cache is to be
#: kept warm: one chunk per shape for any model up to ~13B (a 7B model's 128 r=16 LoRA A tensors
#: with rank-32 bases are ~170 MB of gradients, components and bases), temporaries still bounded.
ACCEL_CHUNK_BYTES = 2**30


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

    Bases are keyed by tensor name, so routed tensors must be named (``param_names``). A bank
    that holds bases yet matches none of the routed tensors is an error (it would project
    nothing); bases for names that no routed tensor has are warned about once per bank
    version. ``metrics()`` reports ``projected_tensors`` and ``projected_elements`` of the last
    step, so a run whose projection covers nothing shows it.

    ``batched=True`` (default) stacks same-shaped tensors and projects each group with two
    ``bmm`` calls against bases stacked once per domain (no host sync); ``batched=False`` is the
    readable per-tensor loop. Both give the same g~ up to float rounding (tested). A group is cut
    into chunks of at most ``chunk_bytes`` of working set (default: ``CHUNK_BYTES``, 16 MiB, on a
    CPU, so a chunk stays in cache; ``ACCEL_CHUNK_BYTES``, 1 GiB, elsewhere, so a GPU launches a
    chunk's kernels once per shape, not once per 16 MiB).
    """

    def __init__(self, bank: SubspaceBank, strength: float | Strength = 1.0,
                 weighted: bool = True, side: str = "in", *, batched: bool = True,
                 chunk_bytes: int | None = None) -> None:
        if side not in SIDES:
            raise ValueError(f"Projection: side must be one of {SIDES}, got {side!r}")
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 1):
            raise ValueError(f"Projection: chunk_bytes must be a positive int (or None: by device), "
                             f"got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        self.bank = bank
        self.strength = as_strength(strength)
        self.weighted = weighted
        self.side = side
        self._sides = ("in", "out") if side == "both" else (side,)
        self.batched = batched
        self._last_alphas: dict[str, float | Tensor] = {}
        self._plan_cache: tuple[Any, list[_Group]] | None = None
        self._staged: tuple[dict[str, float | Tensor], int, int] | None = None
        self.projected_tensors = 0
        self.projected_elements = 0
        self._checked: tuple[int, tuple[str, ...]] | None = None

    needs_names = True
    #: g~ = g - alpha * G U diag(s) U^T with alpha, s in [0, 1] (the strengths and the bank enforce
    #: both): an orthogonal projection's component, scaled by at most 1, so ||g~|| <= ||g||
    contracts = True

    def _bases(self, name: str, g: Tensor) -> list[tuple[str, Tensor, Tensor]]:
        if g.ndim < 2:
            return []
        out = []
        for side in self._sides:
            proj = self.bank.projector(name, side, device=g.device, dtype=torch.float32)
            if proj is None or proj[0].shape[1] == 0:
                continue
            dim = fan_in(g) if side == "in" else g.shape[0]
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
        G = as_matrix(g)
        if side == "in":
            coords = G @ U
            comp = (coords * s if self.weighted else coords) @ U.T
        else:
            coords = U.T @ G
            comp = U @ (coords * s[:, None] if self.weighted else coords)
        overlap = coords.square().sum() / G.square().sum().clamp_min(1e-30)
        return comp.reshape(g.shape), overlap

    def apply(self, batch: GradBatch) -> list[Tensor]:
        self._check_coverage(batch.names)
        if not self.batched:
            return self._apply_loop(batch)
        out = list(batch.grads)
        groups = self._plan(batch.names, batch.grads)
        found: list[tuple[int, Tensor]] = []  # (index into the batch, overlap)
        work = []
        for group in groups:
            G = group.stack([batch.grads[i] for i in group.idx])
            coords = [_coords(G, side, U) for side, U, _ in group.bases]
            overlaps = [_energy(c) for c in coords]
            overlap = overlaps[0] if len(overlaps) == 1 else torch.stack(overlaps).mean(0)
            energy = _energy(G)
            if all(batch.grads[i] is batch.raw[i] for i in group.idx):
                batch.raw_sq_norms.append((group.idx, energy))  # the guard's check of these g
            overlap = overlap / energy.clamp_min(1e-30)
            found += list(zip(group.idx, overlap.unbind(0), strict=True))
            work.append((group, G, coords[0]))
        found.sort(key=lambda t: t[0])
        names = [batch.names[i] for i, _ in found]
        alphas = self.strength.propose(names, [o for _, o in found])
        self._stage(names, alphas, [batch.grads[i] for i, _ in found])
        by_index = {i: a for (i, _), a in zip(found, alphas, strict=True)}
        for group, G, coords in work:
            group_alphas = [by_index[i] for i in group.idx]
            keep = [not _is_zero(a) for a in group_alphas]
            if not any(keep):
                continue  # g~ = g exactly: the incoming tensor objects stay
            alpha = _alpha_vector(group_alphas, G)
            side, U, s = group.bases[0]
            if batch.m_only and len(group.bases) == 1:
                # g~ - g = -alpha * comp is all the optimizer needs, expanded once it knows the
                # step stands (a skipped step zeroes the small coordinates, not the delta)
                batch.m_delta_fns.append(_GroupDelta(group, coords, side, U, self._scale(s, alpha),
                                                     keep, group.output(G)))
                continue
            # g~ = G - alpha * comp, written into the group's output buffer (no fresh pages)
            g = _expand(coords, side, U, self._scale(s, alpha), out=group.output(G), add=G)
            # side="both": the out-side component is taken of the in-projected gradient.
            for side, U, s in group.bases[1:]:
                g = g + _expand(_coords(g, side, U), side, U, self._scale(s, alpha)).view_as(g)
            for i, k, gi in zip(group.idx, keep, g.unbind(0), strict=True):
                if k:
                    out[i] = gi
        return out

    def _scale(self, s: Tensor, alpha: float | Tensor) -> Tensor:
        """-alpha * s per (tensor, direction): (n, k); alpha is a float, 0-d or (n,)."""
        weights = s if self.weighted else torch.ones_like(s)  # padded columns of U are 0 anyway
        if isinstance(alpha, Tensor) and alpha.dim() == 1:
            return weights * -alpha[:, None]
        return weights * -alpha

    def _apply_loop(self, batch: GradBatch) -> list[Tensor]:
        """The readable per-tensor path (``batched=False``); the batched path is tested against it."""
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
        alphas = self.strength.propose(names, overlaps)
        self._stage(names, alphas, [batch.grads[i] for i, _, _ in found])
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

    def _stage(self, names: list[str], alphas: list[float | Tensor], grads: list[Tensor]) -> None:
        taken = [(n, g) for n, a, g in zip(names, alphas, grads, strict=True) if not _is_zero(a)]
        self._staged = (dict(zip(names, alphas, strict=True)), len(taken),
                        sum(g.numel() for _, g in taken))

    @property
    def device_commit(self) -> bool:  # type: ignore[override]
        return self.strength.device_commit

    def commit(self, keep: Tensor | None = None) -> None:
        # projected_tensors / projected_elements follow the alphas the host knows (a float 0
        # projects nothing): with ``keep`` they are the last step's that ran, skipped or not
        self.strength.commit() if keep is None else self.strength.commit(keep)
        if self._staged is not None:
            self._last_alphas, self.projected_tensors, self.projected_elements = self._staged
            self._staged = None

    def _check_coverage(self, names: list[str]) -> None:
        """Refuse a bank that matches no routed tensor; warn once about bases that match none.

        Checked once per (bank version, names): no cost on later steps.
        """
        key = (self.bank.version, tuple(names))
        if self._checked == key:
            return
        banked = set(self.bank.names())
        routed = set(names)
        if banked and not banked & routed:
            shown = ", ".join(sorted(banked)[:3])
            raise ValueError(
                f"Projection: the bank holds bases for {len(banked)} tensor(s) ({shown}, ...) but "
                f"none of the {len(names)} routed tensors has one of those names (routed: "
                f"{', '.join(names[:3])}, ...); name the routed tensors as the bank does "
                "(lora_cl.param_groups(model) sets 'param_names') or build the bank on this model")
        stray = sorted(banked - routed)
        if stray:
            warnings.warn(f"Projection: {len(stray)} of the bank's {len(banked)} tensor names match "
                          f"no routed tensor and are not projected: {', '.join(stray[:5])}"
                          + (" ..." if len(stray) > 5 else ""), RuntimeWarning, stacklevel=4)
        self._checked = key

    def _plan(self, names: list[str], grads: list[Tensor]) -> list[_Group]:
        """Tensors with bases, grouped by (shape, device, sides) with their stacked projectors.

        Cached per (bank version, names, shapes, devices): the grouping and the stacked bases
        are built once per domain, not per step. Groups are cut into chunks of about
        ``chunk_bytes`` (gradients, components and bases; by default ``CHUNK_BYTES`` on a CPU, so
        that both ``bmm`` calls of a chunk find its bases in cache and the temporaries come from
        the heap, not fresh pages, and ``ACCEL_CHUNK_BYTES`` on other devices).
        """
        key = (self.bank.version, tuple(names), tuple((tuple(g.shape), g.device) for g in grads))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        members: dict[tuple[Any, ...], list[int]] = {}
        for i, (name, g) in enumerate(zip(names, grads, strict=True)):
            sides = tuple(side for side, _, _ in self._bases(name, g))  # validates dimensions
            if sides:
                members.setdefault((tuple(g.shape), g.device, sides), []).append(i)
        groups = []
        for (shape, device, sides), idx in members.items():
            per_tensor = 4 * (3 * math.prod(shape) + sum(
                self.bank.projector(names[idx[0]], side, device=device)[0].numel() for side in sides))
            limit = self.chunk_bytes or (CHUNK_BYTES if torch.device(device).type == "cpu"
                                         else ACCEL_CHUNK_BYTES)
            step = max(1, limit // per_tensor)
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                group_names = tuple(names[i] for i in chunk)
                bases = [(side, *self.bank.stacked_projector(group_names, side, device=device))
                         for side in sides]
                groups.append(_Group(chunk, bases))
        self._plan_cache = (key, groups)
        return groups

    def project_update(self, names: list[str], deltas: list[Tensor]) -> list[Tensor]:
        """Re-project a final parameter update with each tensor's alpha of the last step."""
        out = list(deltas)
        if not self.batched:
            for i, name in enumerate(names):
                alpha = self._last_alphas.get(name, 0.0)
                if _is_zero(alpha):
                    continue
                for base in self._bases(name, out[i]):
                    out[i] = out[i] - alpha * self._component(out[i], *base)[0]
            return out
        for group in self._plan(names, deltas):
            group_alphas = [self._last_alphas.get(names[i], 0.0) for i in group.idx]
            keep = [not _is_zero(a) for a in group_alphas]
            if not any(keep):
                continue
            d = torch.stack([deltas[i].float() for i in group.idx])
            alpha = _alpha_vector(group_alphas, d)
            for side, U, s in group.bases:
                d = d + _expand(_coords(d, side, U), side, U, self._scale(s, alpha)).view_as(d)
            for i, k, di in zip(group.idx, keep, d.unbind(0), strict=True):
                if k:
                    out[i] = di
        return out

    def on_domain_start(self, domain: str) -> None:
        self.strength.reset()

    def metrics(self) -> dict[str, float]:
        return {**self.strength.metrics(), "projected_tensors": float(self.projected_tensors),
                "projected_elements": float(self.projected_elements)}

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


@dataclass
class _Group:
    """Batch indices of same-shaped tensors, their stacked (side, U (n,d,k), s (n,k)) bases and
    two work buffers reused every step (the stacked gradients and g~; fresh buffers of this size
    would cost page faults on every step)."""

    idx: list[int]
    bases: list[tuple[str, Tensor, Tensor]]
    _in: Tensor | None = None
    _out: Tensor | None = None

    def stack(self, tensors: list[Tensor]) -> Tensor:
        like = tensors[0]
        if self._in is None or self._in.device != like.device:
            self._in = torch.empty((len(tensors), *like.shape), dtype=torch.float32, device=like.device)
        return torch.stack([t if t.dtype == torch.float32 else t.float() for t in tensors], out=self._in)

    def output(self, like: Tensor) -> Tensor:
        if self._out is None or self._out.device != like.device:
            self._out = torch.empty_like(like)
        return self._out


def _coords(G: Tensor, side: str, U: Tensor) -> Tensor:
    """Coordinates of a stacked G (n, *shape) in its bases: G U ("in") or U^T G ("out")."""
    n = G.shape[0]
    if side == "in":
        return torch.bmm(G.reshape(n, G.shape[1], -1), U)
    return torch.bmm(U.transpose(1, 2), G.reshape(n, G.shape[1], -1))


class _GroupDelta:
    """GradBatch.m_delta_fns entry of one group: g~ - g = -alpha comp, unexpanded.

    Called with the step's ``keep`` it expands g~ - g into the group's ``out`` buffer and returns
    {batch index: g~ - g}; :meth:`add_into` instead adds ``scale * (g~ - g)`` straight into the
    group's first moments stacked in one tensor, in the product that expands it (one pass over
    m, no g~ - g formed)."""

    def __init__(self, group: _Group, coords: Tensor, side: str, U: Tensor, scale: Tensor,
                 taken: list[bool], out: Tensor) -> None:
        self.group, self.coords, self.side, self.U, self.scale = group, coords, side, U, scale
        self.taken, self.out = taken, out
        #: the batch indices this entry changes, in the group's order
        self.idx = [i for i, k in zip(group.idx, taken, strict=True) if k]

    def __call__(self, keep: Tensor) -> dict[int, Tensor]:
        d = _expand(self.coords, self.side, self.U, self.scale, out=self.out, keep=keep)
        return {i: di for i, k, di in zip(self.group.idx, self.taken, d.unbind(0), strict=True) if k}

    @property
    def whole_group(self) -> bool:
        """Whether every tensor of the group is changed (add_into covers the whole group)."""
        return all(self.taken)

    def add_into(self, m: Tensor, keep: Tensor, scale: float) -> None:
        """m += scale * (g~ - g), m the group's moments stacked (n, *shape); exact no-op where
        ``keep`` is False. Only for a whole group (:attr:`whole_group`)."""
        _expand(self.coords, self.side, self.U, self.scale, keep=keep, into=m, alpha=scale)


def _expand(coords: Tensor, side: str, U: Tensor, scale: Tensor, out: Tensor | None = None,
            add: Tensor | None = None, keep: Tensor | None = None, into: Tensor | None = None,
            alpha: float = 1.0) -> Tensor:
    """(coords * scale) mapped back: (C diag(scale)) U^T ("in") or U diag(scale) C ("out"), plus
    ``add`` (same shape as ``out``) in the same kernel when given; with ``into`` (n, *shape)
    instead, ``into += alpha * result`` in place. ``keep`` False (a 0-d bool) zeroes the small
    scaled coordinates first, so the result is exactly 0 even from NaNs."""
    n = coords.shape[0]
    if side == "in":
        a, b = coords * scale[:, None, :], U.transpose(1, 2)
        if keep is not None:
            a = torch.where(keep, a, 0.0)
    else:
        a, b = U, coords * scale[:, :, None]
        if keep is not None:
            b = torch.where(keep, b, 0.0)
    shape = (n, a.shape[1], b.shape[2])
    if into is not None:
        into.view(shape).baddbmm_(a, b, alpha=alpha)
        return into
    if out is None:
        return torch.bmm(a, b)
    if add is None:
        return torch.bmm(a, b, out=out.view(shape)).view(out.shape)
    return torch.baddbmm(add.reshape(shape), a, b, out=out.view(shape)).view(out.shape)


def _energy(x: Tensor) -> Tensor:
    """Squared Frobenius norm of each stacked item (no temporary the size of x)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


def _alpha_vector(alphas: list[float | Tensor], like: Tensor) -> Tensor | float:
    """Per-tensor strengths of a group: a float or 0-d tensor when all are one, else (n,)."""
    first = alphas[0]
    if all(a is first for a in alphas) or (isinstance(first, float)
                                           and all(isinstance(a, float) and a == first for a in alphas)):
        return float(first) if isinstance(first, (int, float)) else first.to(like)
    return torch.stack([torch.as_tensor(a, dtype=like.dtype, device=like.device) for a in alphas])
