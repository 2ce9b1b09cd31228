"""Per-domain orthonormal bases for each routed tensor, merged into one projector at use time."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

MODES = ("accumulate", "replace")
SIDES = ("in", "out")
ORTHO_TOL = 1e-3
REORTHO_TOL = 1e-5
_META_KEY = "lora_cl.subspace_bank"
_FORMAT = 1


def check_side(side: str) -> str:
    """Validate a side name: "in" = fan-in (last dim), "out" = fan-out (first dim)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side


class SubspaceBank:
    """Bases U_t (dim x k_t, orthonormal) and weights s_t in [0, 1], per domain t and (name, side).

    ``projector`` merges them for the optimizer. "accumulate" keeps the union of all domains:
    M = [U_1 diag(s_1), ..., U_T diag(s_T)] = Q S W^T (thin SVD), U = Q[:, S > 1e-6 S_max] and
    s = min(S, 1), so orthogonal domains keep their own weights and a direction shared by several
    domains is protected fully (never above 1). "replace" uses only the most recent domain with a
    basis for (name, side), as the paper's companion code does. ``version`` changes on every
    mutation; the merged projectors are cached per (name, side, device, dtype) until it does.
    """

    def __init__(self, mode: str = "accumulate", max_rank: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"SubspaceBank mode must be one of {MODES}, got {mode!r}")
        if max_rank is not None and (isinstance(max_rank, bool) or int(max_rank) != max_rank
                                     or max_rank < 1):
            raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
        self.mode = mode
        self.max_rank = None if max_rank is None else int(max_rank)
        self.version = 0
        # domain -> {(name, side): (U, s)}; dict order is the domains' insertion order
        self._bases: dict[str, dict[tuple[str, str], tuple[Tensor, Tensor]]] = {}
        self._cache: dict[tuple[Any, ...], tuple[Tensor, Tensor] | None] = {}
        self._cache_version = 0
        # (domain, name, side) -> when it was last added: "replace" uses the latest add, even
        # when a domain that came first is added again
        self._seq: dict[tuple[str, str, str], int] = {}

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._bases.values())
        return (f"SubspaceBank(mode={self.mode!r}, max_rank={self.max_rank}, "
                f"domains={self.domains()}, tensors={n})")

    # ----------------------------------------------------------------------------- mutation
    def add(self, domain: str, name: str, basis: Tensor, weights: Tensor | None = None,
            side: str = "in") -> None:
        """Store a domain's basis U (dim x k, U^T U = I) and weights s (k,) in [0, 1].

        A U within the orthonormality tolerance but off by more than fp32 rounding (1e-5) is
        re-orthonormalised (QR, signs kept), so it projects exactly; an exact one is stored as is.
        """
        check_side(side)
        if not isinstance(domain, str) or not isinstance(name, str):
            raise TypeError(f"domain and name must be str, got {type(domain).__name__} "
                            f"and {type(name).__name__}")
        where = f"basis for {name!r} (side {side!r}, domain {domain!r})"
        if not isinstance(basis, Tensor) or basis.dim() != 2:
            shape = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
            raise ValueError(f"{where} must be a 2-D tensor (dim, k), got {shape}")
        u = basis.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        dim, k = u.shape
        if not torch.isfinite(u).all():
            raise ValueError(f"{where} has non-finite entries")
        err = (u.T @ u - torch.eye(k)).abs().max().item() if k else 0.0
        if err > ORTHO_TOL:
            raise ValueError(f"{where} is not orthonormal: max |U^T U - I| = {err:.3g} > "
                             f"{ORTHO_TOL} (orthonormalise it, e.g. torch.linalg.qr)")
        if weights is None:
            s = torch.ones(k)
        else:
            s = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float32)
            s = s.contiguous().clone()
            if s.shape != (k,):
                raise ValueError(f"weights for {where} must have shape ({k},), "
                                 f"got {tuple(s.shape)}")
            if not torch.isfinite(s).all() or (k and (s.min() < 0 or s.max() > 1)):
                raise ValueError(f"weights for {where} must lie in [0, 1]")
        for other, entries in self._bases.items():
            prev = entries.get((name, side))
            if prev is not None and other != domain and prev[0].shape[0] != dim:
                raise ValueError(f"{where} has dim {dim} but domain {other!r} stored dim "
                                 f"{prev[0].shape[0]} for the same tensor")
        if err > REORTHO_TOL:  # within ORTHO_TOL: made exact (same span, order and signs)
            q, r = torch.linalg.qr(u.double())
            sign = torch.diagonal(r).sign()
            u = (q * sign.masked_fill(sign == 0, 1.0)).float()
        self._bases.setdefault(domain, {})[(name, side)] = (u.contiguous(), s)
        self.version += 1
        self._seq[(domain, name, side)] = self.version

    def drop_domain(self, domain: str) -> None:
        """Forget every basis of ``domain``."""
        if domain not in self._bases:
            raise KeyError(f"unknown domain {domain!r}; known domains: {self.domains()}")
        del self._bases[domain]
        self._seq = {key: v for key, v in self._seq.items() if key[0] != domain}
        self.version += 1

    # -------------------------------------------------------------------------------- query
    def domains(self) -> list[str]:
        """Domains in insertion order."""
        return list(self._bases)

    def names(self, side: str | None = None) -> list[str]:
        """Tensor names with at least one basis (on ``side`` if given), in first-seen order."""
        if side is not None:
            check_side(side)
        seen: dict[str, None] = {}
        for entries in self._bases.values():
            for n, sd in entries:
                if side is None or sd == side:
                    seen.setdefault(n, None)
        return list(seen)

    def has(self, name: str, side: str = "in") -> bool:
        """Whether any domain holds a basis for (name, side)."""
        check_side(side)
        return any((name, side) in entries for entries in self._bases.values())

    def get(self, domain: str, name: str, side: str = "in") -> tuple[Tensor, Tensor] | None:
        """That domain's own (U, s) for (name, side) as copies, or None."""
        check_side(side)
        hit = self._bases.get(domain, {}).get((name, side))
        return None if hit is None else (hit[0].clone(), hit[1].clone())

    def projector(self, name: str, side: str = "in", *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor] | None:
        """The merged (U, s) to project with at step time (cached; treat as read-only), or None.

        accumulate: M = [U_t diag(s_t)]_t = Q S W^T, keep S > 1e-6 S_max (top max_rank, <= dim),
        U = Q[:, :k], s = min(S, 1). replace: the last domain's (U, s) for (name, side).
        """
        check_side(side)
        self._sync_cache()
        dev = torch.device("cpu") if device is None else torch.device(device)
        key = (name, side, str(dev), dtype)
        if key not in self._cache:
            merged = self._merge(name, side)
            self._cache[key] = None if merged is None else (
                merged[0].to(device=dev, dtype=dtype), merged[1].to(device=dev, dtype=dtype))
        return self._cache[key]

    def stacked_projector(self, names: tuple[str, ...], side: str = "in", *,
                          device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The merged projectors of ``names`` (one shared dimension) stacked for batched use.

        Returns U of shape (n, dim, k_max) and s of shape (n, k_max): tensors with fewer than
        k_max directions are padded with zero columns and zero weights, which add nothing to
        G U or to the projection. Cached like :meth:`projector` (treat as read-only). Every name
        must hold a basis on ``side``.
        """
        check_side(side)
        self._sync_cache()
        dev = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(names), side, str(dev), dtype, "stacked")
        hit = self._cache.get(key)
        if hit is None:
            merged = [self.projector(n, side, device=dev, dtype=dtype) for n in names]
            missing = [n for n, m in zip(names, merged, strict=True) if m is None]
            if missing:
                raise KeyError(f"no basis on side {side!r} for {missing[:3]}")
            dims = {m[0].shape[0] for m in merged if m is not None}
            if len(dims) != 1:
                raise ValueError(f"stacked_projector: the bases of {len(names)} tensors have "
                                 f"different dimensions {sorted(dims)}")
            k = max(m[1].numel() for m in merged if m is not None)
            u = torch.zeros(len(names), dims.pop(), k, dtype=dtype, device=dev)
            s = torch.zeros(len(names), k, dtype=dtype, device=dev)
            for i, (name, m) in enumerate(zip(names, merged, strict=True)):
                assert m is not None
                ki = m[1].numel()
                u[i, :, :ki] = m[0]
                s[i, :ki] = m[1]
                # the per-name projector becomes a view of the stack: the bases are held once
                self._cache[(name, side, str(dev), dtype)] = (u[i, :, :ki], s[i, :ki])
            hit = self._cache[key] = (u, s)
        return hit

    def _sync_cache(self) -> None:
        """Drop the cached projectors once the bases changed (``version``)."""
        if self._cache_version != self.version:
            self._cache.clear()
            self._cache_version = self.version

    def _merge(self, name: str, side: str) -> tuple[Tensor, Tensor] | None:
        parts = [e[(name, side)] for e in self._bases.values() if (name, side) in e]
        if not parts:
            return None
        if self.mode == "replace":  # the latest add, not the domain first seen last
            latest = max((d for d, e in self._bases.items() if (name, side) in e),
                         key=lambda d: self._seq[(d, name, side)])
            u, s = self._bases[latest][(name, side)]
            if self.max_rank is not None and s.numel() > self.max_rank:
                keep = torch.argsort(s, descending=True, stable=True)[: self.max_rank]
                u, s = u[:, keep], s[keep]
            return (u.clone(), s.clone()) if s.numel() else None
        m = torch.cat([u * s for u, s in parts], dim=1)
        if m.shape[1] == 0:
            return None
        q, sv, _ = torch.linalg.svd(m.double(), full_matrices=False)
        if sv.numel() == 0 or sv[0] <= 0:
            return None
        k = int((sv > 1e-6 * sv[0]).sum())
        k = min(k, m.shape[0], self.max_rank if self.max_rank is not None else k)
        return q[:, :k].float().contiguous(), sv[:k].clamp(max=1.0).float()

    # ------------------------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        """Bytes held by the stored bases U (dim * k * 4 each); weights and cache reported apart."""
        per_domain: dict[str, int] = {}
        per_name: dict[str, int] = {}
        tensors = weight_bytes = 0
        for domain, entries in self._bases.items():
            per_domain[domain] = 0
            for (name, _side), (u, s) in entries.items():
                b = u.numel() * u.element_size()
                per_domain[domain] += b
                per_name[name] = per_name.get(name, 0) + b
                weight_bytes += s.numel() * s.element_size()
                tensors += 1
        cache_bytes = sum(t.numel() * t.element_size()  # views of stacked projectors count once
                          for v in self._cache.values() if v is not None for t in v if t._base is None)
        return {"per_domain": per_domain, "total_bytes": sum(per_domain.values()),
                "tensors": tensors, "per_name": per_name, "weight_bytes": weight_bytes,
                "cache_bytes": cache_bytes}

    def format_memory_report(self) -> str:
        """The memory report as human-readable lines in MiB."""
        r = self.memory_report()
        mib = 1024.0**2
        lines = [f"subspace bank ({self.mode}): {r['tensors']} bases, "
                 f"{r['total_bytes'] / mib:.3f} MiB (+{r['weight_bytes'] / mib:.3f} MiB weights, "
                 f"{r['cache_bytes'] / mib:.3f} MiB cached projectors)"]
        lines += [f"  {d}: {b / mib:.3f} MiB" for d, b in r["per_domain"].items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------------- persistence
    def _entries(self) -> list[tuple[int, str, str, Tensor, Tensor]]:
        """Every basis, in the order it was added (a reload keeps which add is the latest)."""
        rows = [(self._seq[(d, name, side)], i, name, side, u, s)
                for i, (d, entries) in enumerate(self._bases.items())
                for (name, side), (u, s) in entries.items()]
        return [row[1:] for row in sorted(rows, key=lambda row: row[0])]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and scalars (safe for torch.load(weights_only=True))."""
        return {"format": _FORMAT, "mode": self.mode, "max_rank": self.max_rank,
                "domains": self.domains(),
                "bases": [{"domain": i, "name": n, "side": sd, "U": u.clone(), "s": s.clone()}
                          for i, n, sd, u, s in self._entries()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace everything with ``state`` (from :meth:`state_dict`)."""
        missing = {"mode", "max_rank", "domains", "bases"} - set(state)
        if missing:
            raise ValueError(f"SubspaceBank state is missing keys {sorted(missing)}")
        fresh = type(self)(state["mode"], state["max_rank"])
        domains = list(state["domains"])
        for d in domains:
            fresh._bases[d] = {}
        for e in state["bases"]:
            fresh.add(domains[e["domain"]], e["name"], e["U"], e["s"], side=e["side"])
        self.mode, self.max_rank, self._bases = fresh.mode, fresh.max_rank, fresh._bases
        self._seq = dict(fresh._seq)
        self.version += 1

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (keys "<domain index>|<side>|<name>|U|s"), atomically."""
        path = Path(path)
        tensors: dict[str, Tensor] = {}
        order = []
        for i, name, side, u, s in self._entries():
            tensors[f"{i}|{side}|{name}|U"] = u
            tensors[f"{i}|{side}|{name}|s"] = s
            order.append([i, side, name])
        meta = {"format": _FORMAT, "mode": self.mode, "max_rank": self.max_rank,
                "domains": self.domains(), "entries": order}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SubspaceBank:
        """Read a bank written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"subspace bank file not found: {path} "
                                    "(write one with SubspaceBank.save)")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path} is not a lora-cl subspace bank "
                                 f"(no {_META_KEY!r} in its safetensors metadata)")
            meta = json.loads(raw)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: unsupported subspace bank format {meta.get('format')!r}")
            state = {"mode": meta["mode"], "max_rank": meta["max_rank"],
                     "domains": meta["domains"],
                     "bases": [{"domain": i, "name": name, "side": side,
                                "U": f.get_tensor(f"{i}|{side}|{name}|U"),
                                "s": f.get_tensor(f"{i}|{side}|{name}|s")}
                               for i, side, name in meta["entries"]]}
        bank = cls(state["mode"], state["max_rank"])
        bank.load_state_dict(state)
        return bank
