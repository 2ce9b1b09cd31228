"""The replay buffer (examples kept from earlier domains) and the replay-gradient computation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora_cl.optim import dtensor as dt

Collate = Callable[[list[Any]], Mapping[str, Any]]


class ReplayDataError(ValueError):
    """Replay (or an activation basis) is configured but the data it needs cannot be had."""


def is_indexable(dataset: Any) -> bool:
    """Whether ``dataset`` supports ``len`` and integer indexing (a map-style dataset)."""
    return dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """k of range(n) drawn without replacement by a generator seeded with ``seed``, sorted."""
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=generator)[: min(k, n)].tolist())


class ReplayBuffer:
    """Examples kept from earlier domains as (domain, index) pairs into each domain's dataset.

    At each domain end :meth:`add_domain` keeps k = max(1, round(fraction * n)) of the domain's
    n examples, drawn with a generator seeded by (seed, domain index). Only the pairs are state
    (:meth:`state_dict` is JSON-serialisable); the datasets live in ``datasets`` and must be
    given again after :meth:`load_state_dict`.
    """

    def __init__(self, fraction: float = 0.005) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"ReplayBuffer: fraction must be in [0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.entries: list[tuple[str, int]] = []
        self.datasets: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add_domain(self, domain: str, dataset: Any, *, domain_index: int, seed: int = 0) -> int:
        """Keep a seeded ``fraction`` (at least one example) of ``dataset``; return how many."""
        if not is_indexable(dataset) or len(dataset) == 0:
            raise ReplayDataError(f"replay buffer: domain {domain!r} has no indexable, non-empty "
                                  "dataset to keep examples from")
        n = len(dataset)
        k = max(1, round(self.fraction * n))
        kept = seeded_subset(n, k, seed * 1_000_003 + domain_index)
        self.entries = [e for e in self.entries if e[0] != domain]
        self.entries.extend((domain, i) for i in kept)
        self.datasets[domain] = dataset
        return len(kept)

    def sample(self, batch_size: int, seed: int) -> list[Any]:
        """``batch_size`` kept examples (all if fewer), drawn by a generator seeded with ``seed``."""
        missing = sorted({d for d, _ in self.entries if d not in self.datasets})
        if missing:
            raise ReplayDataError(f"replay buffer: no dataset for earlier domain(s) {missing}; after "
                                  "load_state_dict put them in callback.replay.datasets[domain]")
        chosen = seeded_subset(len(self.entries), batch_size, seed)
        return [self.datasets[d][i] for d, i in (self.entries[j] for j in chosen)]

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "entries": [[d, i] for d, i in self.entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fraction = float(state["fraction"])
        self.entries = [(str(d), int(i)) for d, i in state["entries"]]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a collated batch to ``device``."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def replay_share(examples: Sequence[Any], world: int, rank: int) -> tuple[list[Any], bool]:
    """This rank's part of one replay draw for all ``world`` ranks, and whether it counts: every
    ``world``-th example from ``rank``, so the ranks together replay the draw once (the token
    weights of :func:`replay_gradients` make their gradients add up to the whole draw's). A draw
    with fewer examples than ranks gives rank r example r mod k, since every rank must run the
    replay forward (ZeRO-3 and FSDP2 gather the weights in it), and the ranks past the draw's end
    do not count (``counted`` False: their token weight is 0), so each example counts once."""
    if world <= 1:
        return list(examples), bool(examples)
    if len(examples) >= world:
        return list(examples[rank::world]), True
    if not examples:
        return [], False
    return [examples[rank % len(examples)]], rank < len(examples)


def label_tokens(batch: Mapping[str, Any]) -> int:
    """The tokens a causal-LM loss averages over in ``batch``: labels after the one-token shift
    that are not -100 (a batch without labels counts 0; its forward then reports no loss)."""
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        return 0
    return int((labels[..., 1:] != -100).sum())


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replay_gradients(model: nn.Module, batch: Mapping[str, Any], names: Sequence[str],
                     params: Sequence[Tensor], *, max_norm: float = 0.0,
                     counted: bool = True) -> tuple[float, dict[str, Tensor]]:
    """g_r = d loss(replay batch) / d theta for the routed tensors, leaving every ``.grad`` alone.

    Runs in train mode under ``enable_grad`` (the Trainer calls hooks with the model in train
    mode; dropout applies as it does to the loss gradient). With ``max_norm`` > 0, g_r is
    clipped to that global norm, as the Trainer clips the loss gradient before the step. A tensor
    with a loss gradient (``.grad`` set) but no replay gradient is an error, never a silent skip.

    On several ranks (call it on every rank, each with its :func:`replay_share` of one draw) the
    result is the whole draw's gradient on every rank, whole tensors as one process computes
    them: each rank's loss is weighted by its share of the draw's label tokens (as the Trainer
    weights the loss with ``num_items_in_batch``), the weighted gradients are averaged in one
    all-reduce, and the clip applies to the average, as it does to the loss gradient. The
    returned loss is the draw's token-weighted mean. A rank whose share does not count
    (``counted`` False, from :func:`replay_share`: a draw smaller than the world) runs the forward
    and backward with a token weight of 0. Under FSDP2 (DTensor ``params``) the
    backward runs through FSDP's own reduce-scatter with every trainable ``.grad`` set aside and
    put back, and the averaged shards are gathered whole.
    """
    world = _world()
    device = dt.local(params[0]).device if params else torch.device("cpu")
    scale = 1.0
    if world > 1:
        tokens = label_tokens(batch) if counted else 0
        count = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        total = int(count.item())
        scale = tokens * world / total if total > 0 else 1.0
    sharded = any(dt.is_dtensor(p) for p in params)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            out = model(**to_device(batch, device))
            loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
            if loss is None:
                raise ReplayDataError("the replay batch gave no loss: its collated examples need "
                                      "labels (use the same collator/columns as the training data)")
            scaled = loss * scale if world > 1 else loss
            grads = (_fsdp_grads(model, scaled, params) if sharded
                     else torch.autograd.grad(scaled, list(params), allow_unused=True))
    finally:
        model.train(was_training)
    found = {n: g.detach() for n, g in zip(names, grads, strict=True) if g is not None}
    missing = [n for n, p in zip(names, params, strict=True) if p.grad is not None and n not in found]
    if missing:
        raise RuntimeError(
            f"replay gradient: {len(missing)} of {len(names)} routed tensors got a loss gradient but "
            f"no replay gradient (first: {missing[0]!r}). Reentrant activation checkpointing hides "
            "parameters from torch.autograd.grad: set gradient_checkpointing_kwargs="
            "{'use_reentrant': False} (the default) in the training arguments")
    if params and not found:
        raise RuntimeError(f"replay gradient: none of the {len(names)} routed tensors (first: {names[0]!r}) "
                           "is in the replay loss's graph; pass the model's own LoRA tensors (under "
                           "DeepSpeed ZeRO the optimizer holds flat partitions in their place)")
    value = loss.detach().float()
    if world > 1:
        value = value * (scale / world)  # summed over the ranks: the draw's token-weighted mean
        found, value = _average(found, value, world, reduced=sharded)
    if max_norm > 0 and found:
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                           for g in found.values()]))
        clip = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        found = {n: g * clip.to(g.dtype) for n, g in found.items()}
    return float(value), found


def _fsdp_grads(model: nn.Module, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """The replay gradients of FSDP2 (DTensor) ``params``, whole: a plain backward (FSDP's hooks
    all-gather, reduce-scatter and average over the ranks) with every trainable tensor's ``.grad``
    set aside and restored, so the loss gradient stays as it was."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        loss.backward()
        got = [p.grad for p in params]
    finally:
        for p, g in zip(trainable, kept, strict=True):
            p.grad = g
    held = [g for g in got if g is not None]  # the same on every rank (the same graph)
    gathered = iter(dt.whole_many(held))  # collective: one all-gather
    return [None if g is None else next(gathered) for g in got]


def _average(grads: dict[str, Tensor], loss: Tensor, world: int, *,
             reduced: bool) -> tuple[dict[str, Tensor], Tensor]:
    """Weighted replay gradients averaged over the ``world`` ranks (one all-reduce of one flat
    buffer, the loss in its last slot); ``reduced``: the gradients are averaged already (FSDP2)."""
    keys = [] if reduced else list(grads)
    flat = torch.cat([grads[k].float().reshape(-1) for k in keys] + [loss.reshape(1).to(
        next(iter(grads.values())).device if grads else loss.device)])
    dist.all_reduce(flat)
    out = dict(grads)
    at = 0
    for k in keys:
        n = grads[k].numel()
        out[k] = flat[at:at + n].div_(world).view_as(grads[k]).to(grads[k].dtype)
        at += n
    return out, flat[-1]


def collate_chunks(examples: Sequence[Any], collate: Collate, batch_size: int) -> list[Mapping[str, Any]]:
    """``examples`` collated into consecutive batches of at most ``batch_size``."""
    return [collate(list(examples[i:i + batch_size])) for i in range(0, len(examples), batch_size)]
