"""Worker for test_callback_errors.py: a Trainer with ``fsdp=True`` on 2 CPU ranks under torchrun.

The Trainer would train it as plain DDP (../shared/STACK.md); ContinualCallback must refuse.
Writes, from rank 0, whether the Trainer enabled FSDP and the error the stream raised.
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lora_cl


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=out + ".run", use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=1, per_device_train_batch_size=2, fsdp=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(lora_cl.make_optimizer(model, "ogp", lr=1e-3), None))
    callback = lora_cl.attach(trainer, lora_cl.ContinualCallback())
    callback.set_domain("d0")
    error = None
    try:
        trainer.train()
    except RuntimeError as exc:
        error = str(exc)
    if args.process_index == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"is_fsdp_enabled": bool(trainer.is_fsdp_enabled), "error": error,
                       "world_size": args.world_size}, fh)


if __name__ == "__main__":
    main()
