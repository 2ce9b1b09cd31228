"""Split a peft model's trainable tensors into routed (LoRA) and vanilla param groups."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

#: peft LoRA factors: linear/conv ``lora_A``/``lora_B`` (ModuleDicts of layers) and
#: embedding ``lora_embedding_A``/``lora_embedding_B`` (ParameterDicts).
LORA_PATTERN = re.compile(r"(^|\.)lora_(embedding_)?[AB](\.|$)")


def is_lora_name(name: str) -> bool:
    """Whether a parameter name is a peft LoRA factor."""
    return bool(LORA_PATTERN.search(name))


def param_groups(
    model: nn.Module,
    *,
    routing: str = "decoupled",
    lr: float | None = None,
    weight_decay: float | None = None,
    other_lr: float | None = None,
    other_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`~lora_cl.RoutedAdamW`: LoRA tensors routed, the rest vanilla.

    Every trainable tensor whose name matches ``lora_A``/``lora_B`` (or the embedding
    variants ``lora_embedding_A``/``lora_embedding_B``) goes into one group with
    ``routing`` and ``param_names``; every other trainable tensor (``modules_to_save``,
    biases, DoRA magnitudes, prompt embeddings) into a group with ``routing="vanilla"``.
    ``lr``/``weight_decay`` set on a group override the optimizer defaults.
    """
    lora_names, lora, other_names, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_name(name):
            lora_names.append(name)
            lora.append(p)
        else:
            other_names.append(name)
            other.append(p)
    if not lora:
        raise ValueError(
            "param_groups: the model has no trainable peft LoRA tensors (lora_A/lora_B). Wrap it "
            "with peft.get_peft_model(model, LoraConfig(target_modules=[...])) first, and check "
            "that the LoRA adapter is active and trainable."
        )
    groups = [_group(lora, lora_names, routing, lr, weight_decay)]
    if other:
        groups.append(_group(other, other_names, "vanilla", other_lr, other_weight_decay))
    return groups


def _group(params: list, names: list[str], routing: str, lr: float | None,
           weight_decay: float | None) -> dict[str, Any]:
    group: dict[str, Any] = {"params": params, "param_names": names, "routing": routing}
    if lr is not None:
        group["lr"] = lr
    if weight_decay is not None:
        group["weight_decay"] = weight_decay
    return group
