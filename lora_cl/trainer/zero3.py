"""Routed steps under DeepSpeed ZeRO-3: the same full-tensor step as ZeRO-1/2, on stage 3's layout.

Stage 3 partitions every parameter on its own: rank r holds elements ``[r n, (r + 1) n)`` of the
flattened tensor, ``n = ceil(numel / world)`` (``partition_numel``), zero-padded at the end; the
tensor's real shape is ``ds_shape`` (``p.shape`` is ``(0,)`` outside a gather). A sub-group's flat
fp32 partition, the one DeepSpeed hands the client optimizer, is its tensors' partitions end to end
in ``fp16_groups`` order (DeepSpeed's ``set_grad_positions``). DeepSpeed steps one sub-group per
call, with that group's ``params`` set to ``[flat]`` and every other group's left empty, once per
gradient-accumulation boundary, after reducing and clipping the gradients.

:class:`Zero3RoutedStep` keeps :class:`~lora_cl.trainer.zero.ZeroRoutedStep`'s step (gather the
full p, g, m, v; run the unchanged :meth:`RoutedAdamW.step`; write this rank's slice back once the
whole step is known finite) and replaces only the layout: one all-gather per sub-group brings every
rank's partitions, and the write-back keeps this rank's slice. The frozen base stays partitioned;
only the LoRA tensors (a few MB at 7B) are ever whole on a rank.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from lora_cl.trainer.zero import ZeroRoutedStep, ZeroRoutingError


def is_zero3(params: Any) -> bool:
    """Whether any of ``params`` is a DeepSpeed ZeRO-3 parameter (partitioned, ``ds_numel`` set)."""
    return any(hasattr(p, "ds_numel") for p in params)


def gathered_trainable(model: Any) -> contextlib.AbstractContextManager[Any]:
    """Under ZeRO-3 or FSDP2, the model's trainable tensors whole on every rank for the block (a
    domain's end reads them: adapter snapshots, adapter bases, the saved adapter); elsewhere a
    no-op. Collective when sharded: every rank enters it."""
    from lora_cl.trainer.fsdp import fsdp_modules, whole_trainable

    if fsdp_modules(model):
        return whole_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    if not is_zero3(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def check_stage3_layout(optimizer: Any, zero: Any, where: str) -> None:
    """One sub-group per param group, in order, holding exactly that group's named tensors.

    The modifiers must see every routed tensor of a step together, so a routed group may not be
    split across sub-groups (DeepSpeed splits a group larger than ``sub_group_size``).
    """
    groups = optimizer.param_groups
    if len(zero.fp16_groups) != len(groups) or any(zero.sub_group_to_group_id[i] != i
                                                    for i in range(len(groups))):
        raise ZeroRoutingError(
            f"{where}: DeepSpeed split the {len(groups)} param group(s) into {len(zero.fp16_groups)} "
            "sub-groups, so the modifiers could not see every LoRA tensor of a step together; raise "
            "zero_optimization.sub_group_size above the number of trainable parameters")
    for i, group in enumerate(groups):
        names = {zero.param_names.get(p) for p in zero.fp16_groups[i]}
        if "param_names" in group and names != set(group["param_names"]):
            raise ZeroRoutingError(f"{where}: sub-group {i} does not hold param group {i}'s named tensors "
                                   "(DeepSpeed ZeRO-3 layout not recognised)")
    if getattr(zero, "offload_optimizer", False):
        raise ZeroRoutingError(f"{where}: offload_optimizer steps the optimizer on CPU partitions of "
                               "DeepSpeed's own; use deepspeed_configs/zero3.json (no offload)")


class Zero3RoutedStep(ZeroRoutedStep):
    """The client optimizer DeepSpeed ZeRO-3 steps: :class:`RoutedAdamW` on full LoRA tensors.

    fp32 moments live in the sub-groups' flat partitions (each rank its slice), so ZeRO-3
    checkpoints save and load them as DeepSpeed's own; 8-bit per-tensor states (replicated, as
    under ZeRO-1/2) work the same way.
    """

    def _flats(self) -> list[Tensor]:
        return self._zero.fp32_partitioned_groups_flat

    def _tensors(self, index: int) -> list[Tensor]:
        return list(self._zero.fp16_groups[index])

    def _layout(self, index: int) -> tuple[list[Tensor], list[int], list[int], Any]:
        """(tensors, partition sizes, offsets in the flat partition, process group) of sub-group
        ``index``: partitions end to end in ``fp16_groups`` order."""
        lps = self._tensors(index)
        sizes = [int(p.partition_numel()) for p in lps]
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        return lps, sizes, offsets, self._zero._get_sub_group_process_group(index)

    def _full(self, index: int, sources: dict[str, Tensor], keys: list[str]) -> dict[str, list[Tensor]]:
        from deepspeed import comm as dist

        lps, sizes, offsets, group = self._layout(index)
        world = dist.get_world_size(group=group)
        local = torch.stack([sources[k].detach().reshape(-1).to(torch.float32) for k in keys])
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local, group=group)  # a list: gloo has no all_gather_into_tensor
        gathered = torch.stack(pieces)  # [rank, key, flat partition]
        out: dict[str, list[Tensor]] = {}
        for row, key in enumerate(keys):
            out[key] = [gathered[:, row, off:off + n].reshape(-1)[:p.ds_numel].view(p.ds_shape).clone()
                        for p, n, off in zip(lps, sizes, offsets, strict=True)]
        return out

    def _write_own(self, index: int, pairs: list[tuple[Tensor, list[Tensor]]]) -> None:
        from deepspeed import comm as dist

        lps, sizes, offsets, group = self._layout(index)
        rank = dist.get_rank(group=group)
        for dst, fulls in pairs:
            flat = dst.view(-1)
            for p, n, off, full in zip(lps, sizes, offsets, fulls, strict=True):
                lo = rank * n
                real = max(0, min(n, p.ds_numel - lo))  # the last rank's partition is zero-padded
                flat[off:off + real].copy_(full.reshape(-1)[lo:lo + real])
                flat[off + real:off + n].zero_()

    def _recopy(self, index: int) -> None:
        zero = self._zero
        low = zero.fp16_partitioned_groups_flat[index]
        if low is not None and low is not zero.fp32_partitioned_groups_flat[index]:
            low.data.copy_(zero.fp32_partitioned_groups_flat[index].data)
