"""Test helpers for the subspace tests: random orthonormal bases, projectors, token batches."""

from __future__ import annotations

import torch


def orthonormal(dim: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random dim x k matrix with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g))
    return q


def projection(u: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector U U^T onto span(U)."""
    return u @ u.T


def token_batches(n: int, seed: int, low: int = 0, high: int = 128, seq: int = 16) -> list[dict]:
    """``n`` batches of random input_ids in [low, high) with an attention mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(low, high, (2, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
