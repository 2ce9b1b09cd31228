"""Bases of earlier domains: the SubspaceBank and its builders (gradients, activations, dW)."""

from __future__ import annotations

from lora_cl.subspace.activations import ActivationSample, activation_bases
from lora_cl.subspace.adapters import adapter_bases
from lora_cl.subspace.bank import SubspaceBank
from lora_cl.subspace.builders import GradientRowBuffer, basis_from_rows, select_rank

__all__ = [
    "GradientRowBuffer",
    "SubspaceBank",
    "ActivationSample",
    "activation_bases",
    "adapter_bases",
    "basis_from_rows",
    "select_rank",
]
