"""HF Trainer / trl integration: the stream's optimizer, the continual callback, replay."""

from __future__ import annotations

from lora_cl.trainer.callback import ContinualCallback, attach
from lora_cl.trainer.optimizer_factory import (
    RoutedAdamWFactory,
    bank_of,
    make_optimizer,
    method_of,
    routed_optimizer,
)
from lora_cl.trainer.replay import ReplayBuffer, ReplayDataError, replay_gradients

__all__ = [
    "ContinualCallback", "ReplayBuffer", "ReplayDataError", "RoutedAdamWFactory", "attach",
    "bank_of", "make_optimizer", "method_of", "replay_gradients", "routed_optimizer",
]
