"""Split a model's trainable tensors into routed and vanilla param groups.

``route="lora"`` (the default) routes a peft model's LoRA factors; ``route="linear"`` routes every
trainable weight matrix of a plain model's linear layers, for full finetuning of small models
(the paper's own full-parameter setting)."""

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


#: What :func:`tensor_kind` tells apart.
KINDS = ("lora_A", "lora_B", "other")


def tensor_kind(name: str) -> str:
    """``lora_A`` / ``lora_B`` (peft's factors, embedding variants included) or ``other``."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return "lora_A"
    if "lora_B" in name or "lora_embedding_B" in name:
        return "lora_B"
    return "other"


#: What :func:`param_groups` can route.
ROUTES = ("lora", "linear")


def linear_weight_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the weights of linear layers:
    ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (a transposed linear). A weight
    tied to an embedding (a tied LM head) counts once, under the name it has first."""
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 2:
                ids.add(id(weight))
    return {name for name, p in model.named_parameters() if id(p) in ids}


def param_groups(
    model: nn.Module,
    *,
    routing: str = "decoupled",
    route: str = "lora",
    lr: float | None = None,
    weight_decay: float | None = None,
    other_lr: float | None = None,
    other_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`~lora_cl.RoutedAdamW`: the routed tensors in one group, the rest vanilla.

    ``route="lora"``: every trainable tensor whose name matches ``lora_A``/``lora_B`` (or the
    embedding variants ``lora_embedding_A``/``lora_embedding_B``) goes into one group with
    ``routing`` and ``param_names``; every other trainable tensor (``modules_to_save``,
    biases, DoRA magnitudes, prompt embeddings) into a group with ``routing="vanilla"``.
    ``route="linear"``: a plain (non-peft) model fully finetuned; the trainable weights of its
    linear layers (:func:`linear_weight_names`: attention and MLP projections, an untied LM head)
    are routed, biases, norms and embeddings stay vanilla. ``lr``/``weight_decay`` set on a group
    override the optimizer defaults.
    """
    if route not in ROUTES:
        raise ValueError(f"param_groups: route must be one of {ROUTES}, got {route!r}")
    linear = linear_weight_names(model) if route == "linear" else set()
    lora_names, lora, other_names, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if route == "linear" and is_lora_name(name):
            raise ValueError(f"param_groups: route='linear' is for a plain model, but {name!r} is a "
                             "peft LoRA factor; use route='lora' for a peft model")
        if (is_lora_name(name) if route == "lora" else name in linear):
            lora_names.append(name)
            lora.append(p)
        else:
            other_names.append(name)
            other.append(p)
    if not lora and route == "linear":
        raise ValueError("param_groups: route='linear' found no trainable weight of an nn.Linear "
                         "(or Conv1D) layer; unfreeze them (requires_grad=True) or use route='lora' "
                         "on a peft model")
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
