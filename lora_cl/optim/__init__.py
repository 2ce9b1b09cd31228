"""Routed AdamW optimizer."""

from lora_cl.optim.routed_adamw import ROUTINGS, NonFiniteGradientError, RoutedAdamW

__all__ = ["ROUTINGS", "NonFiniteGradientError", "RoutedAdamW"]
