"""FSDP2 (``fully_shard``) parameters in RoutedAdamW: DTensors stepped on their local shards.

AdamW is elementwise, so the update runs on each rank's local shard of p, g, m and v (torch's
fused kernel on plain tensors, as ``torch.optim.AdamW`` does under FSDP2). What is not
elementwise is gathered: the modifier chain sees each DTensor gradient (and parameter) whole, as
in one process, and each rank keeps its own shard of g~ (a local slice of the replicated result,
no communication); the skip-or-step decision is one all-reduce of the ranks' flags, so every rank
skips together. Every rank runs the same chain on the same whole tensors, so modifier states
(EMAs, buffered rows) stay equal across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a DTensor (the same storage: in-place ops update it), else t."""
    return t.to_local() if is_dtensor(t) else t


def check_param(p: Tensor, *, state_bits: int, reproject_update: bool) -> None:
    """Refuse, in one line naming what works, what RoutedAdamW does not step on DTensors."""
    if p.device_mesh.ndim != 1:
        raise ValueError(f"RoutedAdamW: a DTensor parameter on a {p.device_mesh.ndim}-D device mesh "
                         "(HSDP) is not supported; shard with fully_shard on a 1-D mesh")
    if state_bits != 32:
        raise ValueError("RoutedAdamW: state_bits=8 with FSDP2 (DTensor) parameters is not "
                         "supported yet; use state_bits=32, or DeepSpeed ZeRO-1/2 for 8-bit states")
    if reproject_update:
        raise ValueError("RoutedAdamW: reproject_update=True with FSDP2 (DTensor) parameters is "
                         "not supported yet; use reproject_update=False")


def whole(t: Tensor) -> Tensor:
    """The full tensor of a DTensor (an all-gather), else t."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's local shard of ``full`` (the same on every rank) laid out as DTensor ``like``."""
    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()  # Replicate -> Shard: local


def any_rank(flag: Tensor, entries: list[dict[str, Any]]) -> Tensor:
    """``flag`` (a 0-d bool) OR-ed over the ranks of the entries' mesh: one all-reduce, no sync."""
    owners = [e["dtensor"] for e in entries if "dtensor" in e]
    if not owners:
        return flag
    as_float = flag.to(torch.float32).reshape(1)
    dist.all_reduce(as_float, op=dist.ReduceOp.MAX, group=owners[0].device_mesh.get_group())
    return as_float[0] > 0
