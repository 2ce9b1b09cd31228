"""The Trainer (or trl SFTTrainer) of one domain of a stream, built from the recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from lora_cl.optim import RoutedAdamW
from lora_cl.trainer.fsdp import FSDP2_CONFIG, fsdp2_trainer, fsdp_modules
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
    if t.fsdp:  # FSDP2 through accelerate (lora_cl.trainer.fsdp); a later domain's Trainer gets
        # the model the first one sharded, which accelerate keeps as it is (nothing to wrap: its
        # layer classes are FSDP's now, which accelerate's wrap policy would not find)
        kwargs.update(fsdp=True, fsdp_config={**FSDP2_CONFIG, **(
            {"auto_wrap_policy": "NO_WRAP"} if fsdp_modules(model) else {})})
    kwargs[_CKPT_ARG] = recipe.model.gradient_checkpointing
    # Under DeepSpeed the Trainer ignores optimizers=(...), under FSDP it refuses them: both build
    # their optimizer from a factory (under FSDP2, accelerate then swaps in the sharded parameters)
    handover: dict[str, Any] = ({"optimizer_cls_and_kwargs": (_Existing(optimizer), {})}
                                if t.deepspeed or t.fsdp else {"optimizers": (optimizer, None)})
    mix = fsdp2_trainer if t.fsdp else (lambda cls: cls)
    if t.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**kwargs, max_length=recipe.data.seq_len, packing=False)
        trainer = mix(SFTTrainer)(model=model, args=args, train_dataset=data.raw_train,
                             processing_class=tokenizer, **handover)
        if len(trainer.train_dataset) == 0:  # trl truncates on the right, then drops masked rows
            raise StreamError(f"domain {data.name!r}: trl dropped every training example (each prompt "
                              f"fills data.seq_len={recipe.data.seq_len} tokens, leaving no completion "
                              "token); raise data.seq_len")
        return trainer
    args = TrainingArguments(**kwargs, remove_unused_columns=False)
    trainer_cls = mix(FusedLossTrainer if t.fused_loss else Trainer)
    return trainer_cls(model=model, args=args, train_dataset=data.train, data_collator=pad_collate(tokenizer),
                       processing_class=tokenizer, **handover)


class _Existing:
    """``optimizer_cls_and_kwargs`` factory handing the stream's one optimizer to each Trainer."""

    def __init__(self, optimizer: RoutedAdamW) -> None:
        self.optimizer = optimizer

    def __call__(self) -> Callable[..., RoutedAdamW]:
        return lambda *args, **kwargs: self.optimizer
