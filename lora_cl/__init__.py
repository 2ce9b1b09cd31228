"""lora-cl: continual LoRA finetuning with decoupled moment routing.

Gradient modifiers (subspace projection, importance rescaling, replay mixing) change
the gradient g into g~; :class:`RoutedAdamW` feeds g~ to Adam's first moment and, with
``routing="decoupled"``, the raw g to the second, so Adam's normalisation cannot undo
the modification.
"""

from lora_cl.grouping import is_lora_name, param_groups
from lora_cl.modifiers import (
    AGEM,
    EWCPenalty,
    FixedStrength,
    GradBatch,
    GradientModifier,
    Importance,
    ImportanceRescale,
    OverlapAdaptiveStrength,
    Projection,
    ReplayMix,
    Strength,
)
from lora_cl.optim import ROUTINGS, NonFiniteGradientError, RoutedAdamW
from lora_cl.subspace import (
    GradientRowBuffer,
    SubspaceBank,
    activation_bases,
    adapter_bases,
    basis_from_rows,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AGEM", "ROUTINGS", "EWCPenalty", "FixedStrength", "GradBatch", "GradientModifier",
    "GradientRowBuffer", "Importance", "ImportanceRescale", "NonFiniteGradientError",
    "OverlapAdaptiveStrength", "Projection", "ReplayMix", "RoutedAdamW", "Strength",
    "SubspaceBank", "activation_bases", "adapter_bases", "basis_from_rows", "is_lora_name",
    "param_groups",
]
