"""Diagnostics of the attenuate-then-adapt conflict (probes, Proposition 1)."""

from lora_cl.diagnostics.probes import (
    old_direction_lr,
    optimizer_probes,
    overlap,
    v_energy_in_subspace,
    v_share_in_subspace,
)
from lora_cl.diagnostics.prop1 import Prop1Point, run_prop1
from lora_cl.diagnostics.syncs import CountSyncs

__all__ = ["CountSyncs", "Prop1Point", "old_direction_lr", "optimizer_probes", "overlap", "run_prop1",
           "v_energy_in_subspace", "v_share_in_subspace"]
