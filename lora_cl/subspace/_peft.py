"""Find the linear LoRA layers of a peft model and the names of their A and B weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:  # peft (and the bitsandbytes it imports) loads only when LoRA layers are used
    from peft.tuners.lora import LoraLayer


@dataclass(frozen=True)
class LoraLinear:
    """One linear LoRA layer: A (r, d_in), B (d_out, r), dW = scaling * B A."""

    path: str
    layer: LoraLayer
    a_name: str
    b_name: str
    A: Tensor
    B: Tensor
    scaling: float


def lora_linears(model: nn.Module, adapter_name: str = "default") -> list[LoraLinear]:
    """Every LoRA layer of ``model`` carrying ``adapter_name`` with 2-D A and B weights.

    Names are looked up by identity in ``model.named_parameters()``, so they are exactly the
    names the optimizer sees, whatever wrappers sit around the peft model. Embedding and conv
    LoRA variants are skipped (their fan-in is not the weights' last dim).
    """
    from peft.tuners.lora import LoraLayer

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    found: list[LoraLinear] = []
    seen_adapters: set[str] = set()
    for path, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        seen_adapters.update(mod.lora_A.keys())
        if adapter_name not in mod.lora_A:
            continue
        a, b = mod.lora_A[adapter_name].weight, mod.lora_B[adapter_name].weight
        if a.dim() != 2 or b.dim() != 2 or id(a) not in names or id(b) not in names:
            continue
        found.append(LoraLinear(path, mod, names[id(a)], names[id(b)], a, b,
                                float(mod.scaling[adapter_name])))
    if not found:
        raise ValueError(f"no linear LoRA layers with adapter {adapter_name!r} in "
                         f"{type(model).__name__}; adapters present: {sorted(seen_adapters)}")
    return found
