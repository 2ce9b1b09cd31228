"""Bases from samples: SVD of stacked rows, and a chain observer that buffers gradient rows."""

from __future__ import annotations

from collections import deque
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
    """Observer that samples raw-gradient rows of each tensor over its last steps, to build bases.

    The window is a number of optimizer steps: the last ``window_steps`` (default 256, the paper's
    companion code's window) or the whole domain if it is shorter. Rows are subsampled to the
    memory cap ``max_rows`` per tensor: every step of the window keeps the same number of rows
    (its quota, all of its rows while they fit), and when the buffer outgrows the cap the quota
    halves and every kept step is thinned to it (seeded, so a resume is exact). A tensor holds
    at most max(max_rows, window_steps) rows of its side's dimension (fp32, on ``device``).

    side "in": samples are the rows of G viewed (fan_out, fan_in) (output units as samples, as in
    the paper); side "out": samples are the columns of G, i.e. G viewed (fan_out, -1) transposed.
    Only >=2-D tensors whose side dim exceeds ``min_dim`` (default: ``rank``, else 1) are kept,
    since a rank-k basis of a <=k-dim space would block every direction. ``rank``/``energy`` are
    the default rule of :meth:`build` (neither given: rank 32).

    It commits on the device (``device_commit``), so RoutedAdamW's default guard decides
    skip-or-step with no host read: a step the guard skips is pushed as zero rows rather than
    dropped. Zero rows add nothing to the row space a basis is built from (:func:`basis_from_rows`
    sees through them), so a skip changes the basis only through the window counting that step
    and the thinning's subsample; with no skip the rows are the host path's, bit for bit.

    Rows are thinned where the gradient lives and travel to ``device`` (the CPU by default) with a
    non-blocking copy (into pinned memory from a GPU), so a step does not wait for its kernels; the
    buffer waits for its copies only before it reads rows it holds (thinning older steps when the
    quota halves, about log2(max_rows) times a domain, and :meth:`rows`, :meth:`build`,
    :meth:`state_dict`).
    """

    device_commit = True  # a skipped step is pushed as zeros, masked on the device
    contracts = True  # it only observes: g~ = g

    def __init__(self, side: str = "in", *, max_rows: int = 256, window_steps: int = 256,
                 rank: int | None = None, energy: float | None = None, min_dim: int | None = None,
                 only_names: NameFilter | None = None, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        self.side = check_side(side)
        for label, value in (("max_rows", max_rows), ("window_steps", window_steps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        self.max_rows = int(max_rows)
        self.window_steps = int(window_steps)
        self.rank, self.energy = resolve_rule(rank, energy, DEFAULT_RANK, None)
        self.min_dim = int(min_dim) if min_dim is not None else (self.rank or 1)
        self.only_names = only_names
        self.device = torch.device(device)
        self._seed = int(seed)
        self._gen = torch.Generator().manual_seed(self._seed)
        self._slots: dict[str, deque[Tensor]] = {}  # name -> one (rows, dim) sample per step
        self._quota: dict[str, int] = {}  # rows each step of the window keeps
        self._staged: list[tuple[str, Tensor]] = []
        self._fences: dict[torch.device, Any] = {}  # per GPU: a CUDA event after its newest copy

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

    def _thin(self, x: Tensor, quota: int) -> Tensor:
        if x.shape[0] <= quota:
            return x
        keep = torch.randperm(x.shape[0], generator=self._gen)[:quota].sort().values
        return x[keep.to(x.device, non_blocking=True)]

    def _arrived(self) -> None:
        """Wait for the rows still travelling to ``device`` (a no-op unless a GPU copies them)."""
        for fence in self._fences.values():
            fence.synchronize()
        self._fences.clear()

    def __getstate__(self) -> dict[str, Any]:
        self._arrived()  # (a CUDA event neither pickles nor deep-copies; the rows must be there)
        return dict(self.__dict__)

    def push(self, name: str, samples: Tensor) -> None:
        """Add one step's samples (n, dim) of ``name``: the window and the cap as described above."""
        src = samples.detach()
        slots = self._slots.get(name)
        if slots is None or (slots and slots[0].shape[1] != src.shape[1]):
            slots = self._slots[name] = deque(maxlen=self.window_steps)
            self._quota[name] = self.max_rows
        quota = self._quota[name]
        x = self._thin(src, quota)  # on the gradient's device: only the kept rows travel
        to_host = x.device.type == "cuda" and self.device.type == "cpu"  # async, into pinned memory
        moved = x.to(device=self.device, dtype=torch.float32, non_blocking=to_host)
        if to_host:  # (a model split over GPUs copies from each: one fence per device's stream)
            fence = self._fences[x.device] = torch.cuda.Event()
            fence.record(torch.cuda.current_stream(x.device))
        # own memory, never a view of the gradient (thinning, the copy or the cast made one already)
        slots.append(moved.clone() if moved.data_ptr() == src.data_ptr() else moved)
        while quota > 1 and sum(s.shape[0] for s in slots) > self.max_rows:
            quota = max(1, quota // 2)
            self._arrived()  # (thinning reads the rows)
            for i in range(len(slots)):
                slots[i] = self._thin(slots[i], quota)
        self._quota[name] = quota

    def rows(self, name: str) -> Tensor:
        """The buffered samples of ``name``, oldest step first (a copy)."""
        self._arrived()
        return torch.cat(list(self._slots[name]))

    def names(self) -> list[str]:
        """Tensors with buffered rows."""
        return [n for n, slots in self._slots.items() if any(s.shape[0] for s in slots)]

    def apply(self, batch: GradBatch) -> list[Tensor]:
        # staged, pushed by commit(): a skipped step buffers nothing
        self._staged = [(name, g) for name, g in zip(batch.names, batch.raw, strict=True)
                        if self._wanted(name, g)]
        return unchanged(batch)

    def commit(self, keep: Tensor | None = None) -> None:
        for name, g in self._staged:
            samples = self._samples(g)
            if keep is not None:  # the device's skip decision: zeros (not NaN) where it skipped
                samples = torch.where(keep, samples, samples.new_zeros(()))
            self.push(name, samples)
        self._staged = []

    def clear(self) -> None:
        """Drop every buffered row."""
        self._slots.clear()
        self._quota.clear()

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
        return {"rows_buffered": float(sum(s.shape[0] for slots in self._slots.values() for s in slots)),
                "tensors_buffered": float(len(self.names()))}

    def state_dict(self) -> dict[str, Any]:
        self._arrived()
        return {"side": self.side, "max_rows": self.max_rows, "window_steps": self.window_steps,
                "slots": {n: [s.cpu() for s in self._slots[n]] for n in self.names()},
                "quota": {n: self._quota[n] for n in self.names()}, "rng": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("side", "max_rows", "window_steps"):
            saved = state.get(key, 256 if key == "window_steps" else None)
            if saved != getattr(self, key):
                raise ValueError(f"GradientRowBuffer state has {key}={saved!r} but this "
                                 f"buffer has {key}={getattr(self, key)!r}")
        self.clear()
        if "slots" not in state:  # the row-count format of earlier versions: one step of rows
            state = {**state, "slots": {n: [r] for n, r in state["rows"].items()},
                     "quota": {n: self.max_rows for n in state["rows"]}}
        for name, slots in state["slots"].items():
            self._slots[name] = deque((s.to(device=self.device, dtype=torch.float32) for s in slots),
                                      maxlen=self.window_steps)
            self._quota[name] = int(state["quota"][name])
        if "rng" in state:
            self._gen.set_state(state["rng"])
