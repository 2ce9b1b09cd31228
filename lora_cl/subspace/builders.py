"""Bases from samples: SVD of stacked rows, and a chain observer that buffers gradient rows."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor

from lora_cl.modifiers.base import GradBatch, GradientModifier, as_matrix, fan_in, unchanged
from lora_cl.subspace.bank import SubspaceBank, check_side

DEFAULT_RANK = 32
NULL_TOL = 1e-6  # singular values below NULL_TOL * sigma_max are numerically zero: no direction


def resolve_rule(rank: int | None, energy: float | None, default_rank: int | None,
                default_energy: float | None) -> tuple[int | None, float | None]:
    """Resolve (rank, energy): exactly one may be given; neither -> the caller's default rule."""
    if rank is not None and energy is not None:
        raise ValueError(f"give either rank or energy, not both (got rank={rank}, energy={energy})")
    if rank is None and energy is None:
        rank, energy = default_rank, default_energy
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    return rank, energy


def select_rank(sigma: Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """How many leading directions to keep from descending singular values sigma.

    rank: k = min(rank, #{sigma > 1e-6 sigma_max}); energy: the smallest k with
    sum_{i<=k} sigma_i^2 >= energy * sum_i sigma_i^2.
    """
    if sigma.numel() == 0 or sigma[0] <= 0:
        return 0
    nonnull = int((sigma > NULL_TOL * sigma[0]).sum())
    if rank is not None:
        return min(int(rank), nonnull)
    if energy is None:
        raise ValueError("select_rank needs rank or energy")
    sq = sigma.double() ** 2
    cum = torch.cumsum(sq, 0)
    k = int((cum < energy * cum[-1] * (1 - 1e-12)).sum()) + 1
    return min(k, nonnull)


def _seeded_svd_lowrank(a: Tensor, q: int, niter: int, seed: int) -> tuple[Tensor, Tensor]:
    """torch.svd_lowrank under a forked, seeded RNG: deterministic, callers' streams untouched."""
    if a.device.type not in ("cpu", "cuda"):
        a = a.cpu()
    cuda = a.device.type == "cuda"
    index = (a.device.index if a.device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    devices = [index] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        _, sigma, v = torch.svd_lowrank(a, q=q, niter=niter)
    return sigma, v


def basis_from_rows(rows: Tensor, *, rank: int | None = None, energy: float | None = None,
                    niter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Top row-space basis of samples ``rows`` (n, d): U (d, k) orthonormal, s = sigma / sigma_max.

    rows = P Sigma V^T; U = V[:, :k]. Fixed rank (the default, rank 32, as in the paper):
    randomized SVD (torch.svd_lowrank, q = min(rank + 8, n, d), ``niter`` power iterations,
    seeded by ``seed``), k = min(rank, n, d) minus numerically null directions. Energy: full
    SVD, smallest k with sum_{i<=k} sigma_i^2 >= energy * ||rows||_F^2. Give rank or energy.
    """
    rank, energy = resolve_rule(rank, energy, DEFAULT_RANK, None)
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"rows must be a 2-D tensor (samples, dim), got {shape}")
    a = rows.detach().float()
    n, d = a.shape
    empty = a.new_zeros(d, 0), a.new_zeros(0)
    if n == 0 or d == 0:
        return empty
    if not torch.isfinite(a).all():
        raise ValueError("rows contain non-finite values; refusing to build a basis from them")
    if not a.abs().max() > 0:
        return empty
    if rank is not None:
        q = min(rank + 8, n, d)
        sigma, v = _seeded_svd_lowrank(a, q, niter, seed)
        v = v.to(a.device)
        sigma = sigma.to(a.device)
        k = select_rank(sigma, rank=min(rank, n, d))
    else:
        _, sigma, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mT
        k = select_rank(sigma, energy=energy)
    return v[:, :k].contiguous(), sigma[:k] / sigma[0]


NameFilter = Callable[[str], bool] | Collection[str]


class GradientRowBuffer(GradientModifier):
    """Observer that keeps the newest ``max_rows`` raw-gradient rows per tensor, to build bases.

    side "in": samples are the rows of G viewed (-1, fan_in) (output units as samples, as in
    the paper); side "out": samples are the rows of G^T, i.e. G viewed (fan_out, -1) transposed.
    Only >=2-D tensors whose side dim exceeds ``min_dim`` (default: ``rank``, else 1) are kept,
    since a rank-k basis of a <=k-dim space would block every direction. ``rank``/``energy`` are
    the default rule of :meth:`build` (neither given: rank 32).
    """

    def __init__(self, side: str = "in", *, max_rows: int = 256, rank: int | None = None,
                 energy: float | None = None, min_dim: int | None = None,
                 only_names: NameFilter | None = None, device: torch.device | str = "cpu") -> None:
        self.side = check_side(side)
        if int(max_rows) != max_rows or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        self.max_rows = int(max_rows)
        self.rank, self.energy = resolve_rule(rank, energy, DEFAULT_RANK, None)
        self.min_dim = int(min_dim) if min_dim is not None else (self.rank or 1)
        self.only_names = only_names
        self.device = torch.device(device)
        self._buf: dict[str, Tensor] = {}  # name -> (max_rows, dim) ring storage
        self._pos: dict[str, int] = {}  # next write slot
        self._count: dict[str, int] = {}  # valid rows (<= max_rows)

    def _wanted(self, name: str, g: Tensor) -> bool:
        if g.dim() < 2:
            return False
        if self.only_names is not None:
            ok = self.only_names(name) if callable(self.only_names) else name in self.only_names
            if not ok:
                return False
        return (fan_in(g) if self.side == "in" else g.shape[0]) > self.min_dim

    def _samples(self, g: Tensor) -> Tensor:
        if self.side == "in":
            return as_matrix(g)
        return g.reshape(g.shape[0], -1).mT

    def push(self, name: str, samples: Tensor) -> None:
        """Append samples (n, dim) to ``name``'s ring buffer; the newest max_rows win."""
        x = samples.detach()[-self.max_rows:].to(device=self.device, dtype=torch.float32)
        n, dim = x.shape
        buf = self._buf.get(name)
        if buf is None or buf.shape[1] != dim:
            buf = self._buf[name] = torch.zeros(self.max_rows, dim, device=self.device)
            self._pos[name] = self._count[name] = 0
        pos = self._pos[name]
        first = min(n, self.max_rows - pos)
        buf[pos:pos + first] = x[:first]
        buf[: n - first] = x[first:]
        self._pos[name] = (pos + n) % self.max_rows
        self._count[name] = min(self._count[name] + n, self.max_rows)

    def rows(self, name: str) -> Tensor:
        """The buffered samples of ``name``, oldest first (a copy)."""
        buf = self._buf[name]
        if self._count[name] < self.max_rows:
            return buf[: self._count[name]].clone()
        pos = self._pos[name]
        return torch.cat([buf[pos:], buf[:pos]])

    def names(self) -> list[str]:
        """Tensors with buffered rows."""
        return [n for n, c in self._count.items() if c > 0]

    def apply(self, batch: GradBatch) -> list[Tensor]:
        # staged, pushed by commit(): a skipped step buffers nothing
        self._staged = [(name, g) for name, g in zip(batch.names, batch.raw, strict=True)
                        if self._wanted(name, g)]
        return unchanged(batch)

    def commit(self) -> None:
        for name, g in getattr(self, "_staged", ()):
            self.push(name, self._samples(g))
        self._staged = []

    def clear(self) -> None:
        """Drop every buffered row."""
        self._buf.clear()
        self._pos.clear()
        self._count.clear()

    def on_domain_start(self, domain: str) -> None:
        self.clear()

    def build(self, bank: SubspaceBank, domain: str, *, rank: int | None = None,
              energy: float | None = None, niter: int = 2, seed: int = 0) -> int:
        """Add one basis per buffered tensor to ``bank`` under ``domain``, then clear; return count.

        Uses the constructor's rule (rank or energy) unless one is given here.
        """
        if rank is None and energy is None:
            rank, energy = self.rank, self.energy
        added = 0
        for name in self.names():
            u, s = basis_from_rows(self.rows(name), rank=rank, energy=energy, niter=niter,
                                   seed=seed)
            if u.shape[1]:
                bank.add(domain, name, u, s, side=self.side)
                added += 1
        self.clear()
        return added

    def metrics(self) -> dict[str, float]:
        return {"rows_buffered": float(sum(self._count.values())),
                "tensors_buffered": float(len(self.names()))}

    def state_dict(self) -> dict[str, Any]:
        return {"side": self.side, "max_rows": self.max_rows,
                "rows": {n: self.rows(n).cpu() for n in self.names()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("side", "max_rows"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"GradientRowBuffer state has {key}={state.get(key)!r} but this "
                                 f"buffer has {key}={getattr(self, key)!r}")
        self.clear()
        for name, rows in state["rows"].items():
            self.push(name, rows)
