"""A stream under the Trainer's FSDP2 (``fully_shard``): the Trainer's arguments, CPU meshes, and
the whole LoRA tensors a domain's end reads.

The Trainer (through accelerate) shards the model with ``fully_shard`` per decoder layer and at
the root; RoutedAdamW then steps DTensor parameters (:mod:`lora_cl.optim.dtensor`). The model
stays sharded across the stream's Trainers (accelerate leaves an ``FSDPModule`` as it is), so
the one optimizer steps the same DTensors in every domain. An FSDP2 forward is collective (each
layer all-gathers its weights), so every rank evaluates, as under ZeRO-3.

accelerate turns FSDP on only on accelerators: on a CPU it trains ``fsdp=...`` as plain DDP
without a word (../shared/STACK.md). ``fully_shard`` itself runs on a CPU mesh with gloo, so
:class:`Fsdp2Stream` switches the Trainer's accelerator to FSDP2 there (tests and CI run the same
accelerate and Trainer code path as a GPU run).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: ``TrainingArguments.fsdp_config`` of ``training.fsdp: true``: FSDP2, each decoder layer (the
#: model's ``_no_split_modules``) its own unit, parameters resharded after each forward.
FSDP2_CONFIG = {"fsdp_version": 2, "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "SHARDED_STATE_DICT"}
#: Where RoutedAdamW's own state (counters, the modifier chain) goes in a Trainer checkpoint
#: under FSDP2: torch's optimizer state dict, which the Trainer saves there, drops it.
EXTRA_FILE = "lora_cl_optimizer_extra.pt"


def fsdp_modules(model: Any) -> list[Any]:
    """The ``fully_shard`` modules of ``model`` (none when it is not sharded by FSDP2)."""
    if model is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp2(params: Any) -> bool:
    """Whether any of ``params`` is an FSDP2 (DTensor) parameter."""
    from lora_cl.optim.dtensor import is_dtensor

    return any(is_dtensor(p) for p in params)


def steps_fsdp2(optimizer: Any) -> bool:
    """Whether ``optimizer`` steps FSDP2 (DTensor) parameters, routed or not."""
    return is_fsdp2(p for group in optimizer.param_groups for p in group["params"])


@contextlib.contextmanager
def whole_trainable(model: Any) -> Iterator[None]:
    """Under FSDP2, the model's trainable tensors whole on every rank for the block (a domain's
    end reads them: adapter snapshots, adapter bases, the saved adapter); the frozen base stays
    sharded. Each trainable DTensor is all-gathered and registered in its module in place of the
    shard, which is put back after the block (FSDP2 reads its own sharded parameters, not the
    module's attribute, so nothing else sees the swap). Not for forwards. Collective."""
    from lora_cl.optim.dtensor import is_dtensor

    swapped = []
    if fsdp_modules(model):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and is_dtensor(p):
                    whole = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                    module._parameters[name] = whole
                    swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def save_checkpoint_extra(optimizer: Any, args: Any, state: Any) -> None:
    """Beside a Trainer checkpoint under FSDP2, RoutedAdamW's own state (counters, the modifier
    chain: equal on every rank), which torch's optimizer state dict, the one the Trainer saves
    there, drops. Rank 0 writes it, atomically."""
    if not state.is_world_process_zero:
        return
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    if folder.is_dir():
        tmp = folder / (EXTRA_FILE + ".tmp")
        torch.save(optimizer.extra_state_dict(), tmp)
        os.replace(tmp, folder / EXTRA_FILE)


def load_checkpoint_extra(optimizer: Any, args: Any, step: int) -> None:
    """After the Trainer resumed from ``checkpoint-<step>`` under FSDP2: RoutedAdamW's own state
    back from :func:`save_checkpoint_extra` (torch's loader also ran one zero-gradient step at
    lr 0 to create the states, which this undoes in the counters and the chain)."""
    path = Path(args.output_dir) / f"checkpoint-{step}" / EXTRA_FILE
    if not path.is_file():
        raise RuntimeError(f"{path.parent}: a Trainer checkpoint under FSDP2 without {EXTRA_FILE} "
                           "(RoutedAdamW's counters and modifier chain); it was not written by a "
                           "Trainer with ContinualCallback attached: resume from a domain directory "
                           "or start the domain again")
    optimizer.load_extra_state_dict(torch.load(path, weights_only=True))


def fsdp_version(args: Any) -> int:
    """The FSDP version TrainingArguments ask for (transformers keeps it as ``fsdp_config["version"]``
    and hands accelerate ``fsdp_plugin_args["fsdp_version"]``); 1 by default."""
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    config = getattr(args, "fsdp_config", None) or {}
    return int(plugin.get("fsdp_version", config.get("version", config.get("fsdp_version", 1))))


class Fsdp2Stream:
    """Trainer mixin for a stream under FSDP2 (``fsdp_config["fsdp_version"] == 2``).

    - On a CPU, FSDP2 as asked: accelerate enables FSDP only on accelerators and would train the
      model as DDP; this sets the accelerator's state to FSDP with the plugin the Trainer built
      from its arguments, before anything is prepared. On a GPU that part changes nothing.
    - After accelerate's ``prepare`` swapped the optimizer's parameters for their shards, the
      RoutedAdamW's states follow them (:meth:`RoutedAdamW.rebind_states`), before the Trainer
      loads a checkpoint into it (a state keyed by a tensor no group holds breaks torch's
      ``state_dict``, which the loader calls).
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = self.accelerator  # type: ignore[attr-defined]
        state = accelerator.state
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)  # type: ignore[attr-defined]
        if (state.distributed_type == DistributedType.MULTI_CPU and plugin_args is not None
                and fsdp_version(self.args) == 2):  # type: ignore[attr-defined]
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
            self.is_fsdp_enabled = True
        prepare = accelerator.prepare

        def prepare_and_rebind(*args: Any, **kwargs: Any) -> Any:
            from lora_cl.optim import RoutedAdamW
            from lora_cl.trainer.optimizer_factory import unwrap_optimizer

            result = prepare(*args, **kwargs)
            for obj in result if isinstance(result, (tuple, list)) else (result,):
                inner = unwrap_optimizer(obj)
                if isinstance(inner, RoutedAdamW):
                    inner.rebind_states()
            return result

        accelerator.prepare = prepare_and_rebind


def fsdp2_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`Fsdp2Stream` mixed in: what a stream under FSDP2 trains with."""
    return type(f"Fsdp2{trainer_cls.__name__}", (Fsdp2Stream, trainer_cls), {})
