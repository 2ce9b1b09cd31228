"""The causal-LM loss without the (batch x seq x vocab) logits, for the plain HF Trainer.

trl's SFTTrainer already projects through the LM head in tiles and scores only labelled positions
(``trl.trainer.utils.add_fused_lm_head``: per-token log-probabilities from an online logsumexp
over vocabulary tiles, recomputed in backward). ``training.fused_loss: true`` gives the
``training.trainer: trainer`` path the same head: for Llama-3's 128k vocabulary at batch 4 x 2048
that is about 0.5 GiB instead of 12.6 GiB (``lora-cl plan`` shows both). The loss is the mean
token cross-entropy the Trainer computes, up to float summation order (tested).
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

_MARK = "_lora_cl_fused_lm_head"


def enable_fused_head(model: Any) -> Any:
    """Patch ``model``'s causal LM (the base under peft) with trl's fused head, once; return it."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, _MARK, False):
        add_fused_lm_head(base)
        setattr(base, _MARK, True)
    return model


class FusedLossTrainer(Trainer):
    """``transformers.Trainer`` whose training loss goes through the fused LM head.

    Everything else (num_items_in_batch, token averaging across devices, DeepSpeed, gradient
    accumulation) is the Trainer's own ``compute_loss``; only the model call asks for
    ``fused_lm_head=True``, so the model returns the loss and per-token log-probabilities instead
    of logits. Evaluation with ``return_outputs=True`` keeps the logits path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        enable_fused_head(self.model)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if return_outputs or "labels" not in inputs or self.label_smoother is not None \
                or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, {**inputs, "fused_lm_head": True}, False, num_items_in_batch)
