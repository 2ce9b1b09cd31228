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

import io
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a DTensor (the same storage: in-place ops update it), else t."""
    return t.to_local() if is_dtensor(t) else t


def check_param(p: Tensor, *, reproject_update: bool) -> None:
    """Refuse, in one line naming what works, what RoutedAdamW does not step on DTensors."""
    if p.device_mesh.ndim != 1:
        raise ValueError(f"RoutedAdamW: a DTensor parameter on a {p.device_mesh.ndim}-D device mesh "
                         "(HSDP) is not supported; shard with fully_shard on a 1-D mesh")
    if reproject_update:
        raise ValueError("RoutedAdamW: reproject_update=True with FSDP2 (DTensor) parameters is "
                         "not supported yet; use reproject_update=False")


def _blocks(numel: int) -> int:
    from lora_cl.optim.quantized_state import BLOCKSIZE

    return -(-numel // BLOCKSIZE)


def _max_local_blocks(p: Tensor) -> int:
    """Block scales per rank of an 8-bit state of ``p``: enough for the largest local shard
    (torch.chunk's first chunk under ``Shard(0)``), so every rank holds an equal slice."""
    world = p.device_mesh.size()
    rows = p.shape[0] if p.dim() else 1
    per_row = p.numel() // rows if rows else 0
    return _blocks(-(-rows // world) * per_row)


def init_8bit(p: Tensor) -> dict[str, Tensor]:
    """Zero 8-bit moments for DTensor ``p``, blockwise over each rank's local shard: the codes are
    DTensors laid out like ``p``; the block scales a ``Shard(0)`` DTensor with an equal, padded
    slice per rank (so ``torch.distributed.checkpoint`` saves every rank's). A shard whose size
    is a multiple of 256 has the same blocks as the whole tensor in one process."""
    mesh, placements = p.device_mesh, p.placements
    shard = p.to_local()
    nblocks = _max_local_blocks(p)
    out = {}
    for key in ("state1", "state2"):
        codes = torch.zeros(shard.shape, dtype=torch.uint8, device=shard.device)
        out[key] = DTensor.from_local(codes, mesh, placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
    for key in ("absmax1", "absmax2"):
        scales = torch.zeros(nblocks, dtype=torch.float32, device=shard.device)
        out[key] = DTensor.from_local(scales, mesh, [Shard(0)], run_check=False)
    return out


def local_state(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """The rank's part of a DTensor parameter's state as plain tensors (views: updating them
    updates the state): fp32 m and v, or the 8-bit codes with this shard's block scales."""
    if "state1" in state:
        nblocks = _blocks(p.to_local().numel())
        return {"step": state["step"], "state1": local(state["state1"]), "state2": local(state["state2"]),
                "absmax1": local(state["absmax1"])[:nblocks], "absmax2": local(state["absmax2"])[:nblocks]}
    return {"step": state["step"], "exp_avg": local(state["exp_avg"]),
            "exp_avg_sq": local(state["exp_avg_sq"])}


def _like(shard: Tensor, p: Tensor) -> Tensor:
    """A DTensor laid out like ``p`` from this rank's shard ``shard`` (any shape of its numel)."""
    return DTensor.from_local(shard.reshape(p.to_local().shape), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def whole_moments_8bit(state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """fp32 (m, v), whole, of a DTensor parameter's 8-bit state (each rank dequantizes its shard;
    one all-gather each). Collective."""
    from lora_cl.optim import quantized_state as q8

    codes = state["state1"]
    m, v = q8.dequantize(local_state(state, codes))
    return whole(_like(m, codes)), whole(_like(v, codes))


def whole_8bit(state: dict[str, Any]) -> dict[str, Any]:
    """A DTensor parameter's 8-bit state in one process's layout (blocks over the whole tensor):
    dequantized per shard, gathered, quantized whole. Where every shard holds whole blocks the
    codes and scales are the shards' exactly. Collective."""
    from lora_cl.optim import quantized_state as q8

    m, v = whole_moments_8bit(state)
    out = {k: t for k, t in state.items() if k not in q8.Q8_KEYS}
    out.update(q8.init_8bit(m))
    q8.requantize_(out, m, v)
    return out


def shard_8bit(saved: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """A whole 8-bit state (one process's layout, :func:`whole_8bit`) cut to DTensor ``p``'s shard
    and quantized blockwise over it (:func:`init_8bit`'s layout). No communication."""
    from lora_cl.optim import quantized_state as q8

    m, v = q8.dequantize({k: saved[k].to(p.device) for k in q8.Q8_KEYS})
    out = {k: t for k, t in saved.items() if k not in q8.Q8_KEYS}
    out.update(init_8bit(p))
    mine = local_state(out | {"step": None}, p)
    flat = q8.Chunk8bit([mine])
    flat.m[0].copy_(shard_like(m.reshape(p.shape).float(), p))
    flat.v[0].copy_(shard_like(v.reshape(p.shape).float(), p))
    flat.requantize_()
    return out


def whole(t: Tensor) -> Tensor:
    """The full tensor of a DTensor (an all-gather), else t."""
    return t.full_tensor() if is_dtensor(t) else t


def whole_many(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`whole` of each tensor, with one all-gather per (mesh, dtype) for the ``Shard(0)``
    DTensors on a 1-D mesh (FSDP2's layout) instead of one per tensor: each rank sends its local
    shards end to end, each padded to the largest shard of its tensor (``torch.chunk``'s first
    chunk), and every tensor is cut back out of the ranks' pieces. Other tensors: as :func:`whole`.
    Collective when any is such a DTensor: every rank calls it with the same tensors."""
    out = [whole(t) if is_dtensor(t) and not _row_sharded(t) else t for t in tensors]
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t) and _row_sharded(t):
            groups.setdefault((id(t.device_mesh), t.dtype), []).append(i)
    for idx in groups.values():
        mesh = tensors[idx[0]].device_mesh
        world = mesh.size()
        layout = [_chunks(tensors[i], world) for i in idx]  # (rows per chunk, elements per row)
        flat = torch.cat([_padded(tensors[i].to_local().reshape(-1), chunk * per_row)
                          for i, (chunk, per_row) in zip(idx, layout, strict=True)])
        pieces = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(pieces, flat, group=mesh.get_group())  # a list: gloo has no *_into_tensor
        at = 0
        for i, (chunk, per_row) in zip(idx, layout, strict=True):
            t, size = tensors[i], chunk * per_row
            rows = [min(chunk, max(0, t.shape[0] - r * chunk)) for r in range(world)]
            parts = [p[at:at + n * per_row] for p, n in zip(pieces, rows, strict=True)]
            out[i] = torch.cat(parts).view(t.shape)
            at += size
    return out


def _row_sharded(t: Tensor) -> bool:
    return t.device_mesh.ndim == 1 and t.dim() > 0 and tuple(t.placements) == (Shard(0),)


def _chunks(t: Tensor, world: int) -> tuple[int, int]:
    rows = t.shape[0]
    return -(-rows // world), (t.numel() // rows if rows else 0)


def _padded(x: Tensor, n: int) -> Tensor:
    return x if x.numel() == n else torch.cat([x, x.new_zeros(n - x.numel())])


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's local shard of ``full`` (the same on every rank) laid out as DTensor ``like``."""
    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()  # Replicate -> Shard: local


def like_param(full: Tensor, p: Tensor) -> Tensor:
    """A whole tensor of DTensor ``p``'s shape (the same on every rank) as a DTensor laid out like
    ``p``: this rank keeps its shard. No communication."""
    return _like(shard_like(full, p), p)


def to_shards(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """A per-tensor state saved for the whole tensor (one process's layout: ``full_state_dict``, or
    loaded before FSDP2 sharded ``p``) laid out on DTensor ``p``'s shard: 8-bit states requantized
    over the shard's blocks (:func:`shard_8bit`), whole moments cut; entries already DTensors, and
    the rest, as they are. No communication."""
    from lora_cl.optim import quantized_state as q8

    if q8.is_8bit(state) and not is_dtensor(state["state1"]):
        return shard_8bit(state, p)
    return {k: like_param(v, p) if isinstance(v, Tensor) and not is_dtensor(v) and v.shape == p.shape
            else v for k, v in state.items()}


def full_state_dict(optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor state whole (as one process would save it;
    8-bit states requantized over the whole tensor's blocks, :func:`whole_8bit`):
    what ``torch.save`` on one rank can write and any world size can load
    (``load_state_dict`` cuts each state to the parameter's shard again). Collective: every rank
    calls it."""
    from lora_cl.optim import quantized_state as q8

    state = optimizer.state_dict()
    state["state"] = {pid: whole_8bit(s) if q8.is_8bit(s) and is_dtensor(s["state1"]) else
                      {k: whole(v) if is_dtensor(v) else v for k, v in s.items()}
                      for pid, s in state["state"].items()}
    return state


def any_rank(flag: Tensor, entries: list[dict[str, Any]]) -> Tensor:
    """``flag`` (a 0-d bool) OR-ed over the ranks of the entries' mesh: one all-reduce, no sync."""
    if not any("dtensor" in e for e in entries):
        return flag
    return max_rank(flag.to(torch.float32), entries) > 0


def max_rank(value: Tensor, entries: list[dict[str, Any]]) -> Tensor:
    """``value`` (a 0-d float) maxed over the ranks of the entries' mesh: one all-reduce, no sync."""
    owners = [e["dtensor"] for e in entries if "dtensor" in e]
    if not owners:
        return value
    out = value.reshape(1).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=owners[0].device_mesh.get_group())
    return out[0]


def sharded_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """What ``torch.distributed.checkpoint`` saves (and loads into) for an FSDP2 model and its
    RoutedAdamW: the model's and optimizer's sharded states from torch's ``get_state_dict`` (each
    rank writes its shards) and RoutedAdamW's own state (counters, the modifier chain: equal on
    every rank) as one serialized entry, which torch's optimizer state dict would drop.

    Save: ``dcp.save(sharded_state_dict(model, opt), checkpoint_id=path)``. Resume into the same
    model and optimizer built afresh: ``state = sharded_state_dict(model, opt)``,
    ``dcp.load(state, checkpoint_id=path)``, ``load_sharded_state_dict(model, opt, state)``.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    buf = io.BytesIO()
    torch.save(optimizer.extra_state_dict(), buf)  # before get_state_dict's state-creating step
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "lora_cl": buf}


def load_sharded_state_dict(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Put a loaded :func:`sharded_state_dict` back into ``model`` and ``optimizer``.

    torch's ``set_state_dict`` creates the optimizer's states with one zero-gradient step at
    lr 0, which a modifier chain observes; RoutedAdamW's own state is restored after it, so
    the counters and the chain are the checkpoint's.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = state["lora_cl"]
    if isinstance(extra, io.BytesIO):  # (not loaded: the entry as sharded_state_dict made it)
        extra.seek(0)
        extra = torch.load(extra, weights_only=False)
    optimizer.load_extra_state_dict(extra)
