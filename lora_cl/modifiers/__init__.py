"""Gradient modifiers: g -> g~, composable in a chain."""

from lora_cl.modifiers.base import GradBatch, GradientModifier
from lora_cl.modifiers.importance import Importance
from lora_cl.modifiers.projection import Projection
from lora_cl.modifiers.replay import AGEM, ReplayMix
from lora_cl.modifiers.rescale import EWCPenalty, ImportanceRescale
from lora_cl.modifiers.strength import FixedStrength, OverlapAdaptiveStrength, Strength

__all__ = [
    "AGEM", "EWCPenalty", "FixedStrength", "GradBatch", "GradientModifier", "Importance",
    "ImportanceRescale", "OverlapAdaptiveStrength", "Projection", "ReplayMix", "Strength",
]
