"""The Trainer (or trl SFTTrainer) of one domain of a stream, built from the recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from lora_cl.optim import RoutedAdamW
from lora_cl.trainer.fused_loss import FusedLossTrainer

# transformers 5 renamed gradient_checkpointing (a deprecated alias until v6)
_CKPT_ARG = ("activation_checkpointing"
             if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
             else "gradient_checkpointing")


class StreamError(RuntimeError):
    """A stream run cannot start or continue; the message says what to do."""


def make_trainer(recipe: Any, model: Any, tokenizer: Any, optimizer: RoutedAdamW, data: Any,
                 output_dir: Path, *, steps: int, seed: int, progress: bool = True) -> Trainer:
    """The Trainer (``training.trainer: trainer``) or trl SFTTrainer (``sft``) for one domain."""
    from lora_cl.data.examples import pad_collate

    t = recipe.training
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.scheduler, max_grad_norm=t.max_grad_norm,
        bf16=t.bf16, fp16=t.fp16, seed=seed, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=2, logging_steps=t.logging_steps, logging_nan_inf_filter=False,
        report_to=[], disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        deepspeed=t.deepspeed, dataloader_num_workers=0,
    )
    kwargs[_CKPT_ARG] = recipe.model.gradient_checkpointing
    # Under DeepSpeed the Trainer ignores optimizers=(...) and builds its own from a factory
    handover: dict[str, Any] = ({"optimizer_cls_and_kwargs": (_Existing(optimizer), {})}
                                if t.deepspeed else {"optimizers": (optimizer, None)})
    if t.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**kwargs, max_length=recipe.data.seq_len, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data.raw_train,
                             processing_class=tokenizer, **handover)
        if len(trainer.train_dataset) == 0:  # trl truncates on the right, then drops masked rows
            raise StreamError(f"domain {data.name!r}: trl dropped every training example (each prompt "
                              f"fills data.seq_len={recipe.data.seq_len} tokens, leaving no completion "
                              "token); raise data.seq_len")
        return trainer
    args = TrainingArguments(**kwargs, remove_unused_columns=False)
    trainer_cls = FusedLossTrainer if t.fused_loss else Trainer
    return trainer_cls(model=model, args=args, train_dataset=data.train, data_collator=pad_collate(tokenizer),
                       processing_class=tokenizer, **handover)


class _Existing:
    """``optimizer_cls_and_kwargs`` factory handing the stream's one optimizer to each Trainer."""

    def __init__(self, optimizer: RoutedAdamW) -> None:
        self.optimizer = optimizer

    def __call__(self) -> Callable[..., RoutedAdamW]:
        return lambda *args, **kwargs: self.optimizer
