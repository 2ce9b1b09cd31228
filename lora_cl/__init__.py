"""lora-cl: continual LoRA finetuning with decoupled moment routing.

Gradient modifiers (subspace projection, importance rescaling, replay mixing) change
the gradient g into g~; :class:`RoutedAdamW` feeds g~ to Adam's first moment and, with
``routing="decoupled"``, the raw g to the second, so Adam's normalisation cannot undo
the modification.
"""

import lora_cl._quiet  # noqa: F401  (first: filters one bitsandbytes import notice)
from lora_cl.grouping import is_lora_name, param_groups
from lora_cl.methods import PRESETS, MethodError, MethodSpec, build_modifiers, resolve_method
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
from lora_cl.recipe import Recipe, RecipeError, load_recipe
from lora_cl.subspace import (
    GradientRowBuffer,
    SubspaceBank,
    activation_bases,
    adapter_bases,
    basis_from_rows,
)
from lora_cl.trainer import (
    ContinualCallback,
    ReplayDataError,
    RoutedAdamWFactory,
    attach,
    make_optimizer,
)
from lora_cl.trainer.stream import StreamError, run_stream

__version__ = "0.1.0.dev0"

__all__ = [
    "AGEM", "ContinualCallback", "EWCPenalty", "FixedStrength", "GradBatch", "GradientModifier",
    "GradientRowBuffer", "Importance", "ImportanceRescale", "MethodError", "MethodSpec",
    "NonFiniteGradientError", "OverlapAdaptiveStrength", "PRESETS", "Projection", "ROUTINGS", "Recipe",
    "RecipeError", "ReplayDataError", "ReplayMix", "RoutedAdamW", "RoutedAdamWFactory", "StreamError",
    "Strength", "SubspaceBank", "activation_bases", "adapter_bases", "attach", "basis_from_rows",
    "build_modifiers", "is_lora_name", "load_recipe", "make_optimizer", "param_groups", "resolve_method",
    "run_stream",
]
