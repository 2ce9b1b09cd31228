"""Worker for test_callback_errors.py: Trainers with ``fsdp`` on 2 CPU ranks under torchrun.

Two cases: FSDP2 asked of a plain Trainer (on a CPU accelerate trains it as DDP,
../shared/STACK.md), refused by ContinualCallback at the domain's start, and a replay method under
a real FSDP2 Trainer (``lora_cl.trainer.fsdp.fsdp2_trainer``), which trains. Writes, from rank 0,
per case whether the Trainer enabled FSDP and the error the stream raised (None).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lora_cl
from lora_cl.trainer.fsdp import FSDP2_CONFIG, fsdp2_trainer


def case(out: str, name: str, method: str, fsdp_config: dict, trainer_cls: type) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=f"{out}.{name}", use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=1, per_device_train_batch_size=2, fsdp=True, disable_tqdm=True,
                             fsdp_config=fsdp_config)
    optimizer = lora_cl.make_optimizer(model, method, lr=1e-3)
    # (the Trainer refuses optimizers=(...) under FSDP: a factory hands over the stream's one)
    trainer = trainer_cls(model=model, args=args, train_dataset=data,
                          optimizer_cls_and_kwargs=(lambda: lambda *a, **k: optimizer, {}))
    callback = lora_cl.attach(trainer, lora_cl.ContinualCallback())
    callback.set_domain("d0")
    error = None
    try:
        trainer.train()
    except RuntimeError as exc:
        error = str(exc)
    return {"is_fsdp_enabled": bool(trainer.is_fsdp_enabled), "error": error,
            "world_size": args.world_size}


def main() -> None:
    out = sys.argv[1]
    results = {
        "fsdp2_plain_trainer": case(out, "plain", "ogp", dict(FSDP2_CONFIG), Trainer),
        "fsdp2_replay": case(out, "replay", "replay", dict(FSDP2_CONFIG), fsdp2_trainer(Trainer)),
    }
    if torch.distributed.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (no C++ teardown at interpreter exit: see tests/optim/fsdp2_worker.py)


if __name__ == "__main__":
    main()
