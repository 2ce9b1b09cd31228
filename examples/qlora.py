"""Continual LoRA on a 4-bit (bitsandbytes nf4) base: QLoRA with lora-cl's optimizer and callback.

    python examples/qlora.py [MODEL]      # MODEL: smollm2-135m (default), tiny, a dir, a hub id

The model name also comes from $LORA_CL_MODEL. A GPU is the intended target; on a CPU bitsandbytes'
4-bit path is slow and meant for tests. This is docs/guides/qlora.md, runnable.
"""

from __future__ import annotations

import os
import sys
import tempfile

import bitsandbytes as bnb
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import lora_cl
from lora_cl.models import load_model

DOMAINS = {
    "cooking": ["Whisk the eggs with sugar until pale.", "Simmer the sauce gently for ten minutes.",
                "Knead the dough and leave it to rise.", "Season the soup with salt and pepper."],
    "astronomy": ["Jupiter is the largest planet.", "A light year measures a distance.",
                  "The Moon orbits the Earth monthly.", "Comets grow tails near the Sun."],
}


def lm_dataset(tok, texts: list[str], seq: int = 16) -> Dataset:
    """Causal-LM rows: input ids padded to ``seq``, labels = ids with -100 on padding."""
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq)
    labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return Dataset.from_dict({**enc, "labels": labels})


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORA_CL_MODEL", "smollm2-135m")
    out = tempfile.mkdtemp(prefix="lora-cl-qlora-")
    # --- docs/guides/qlora.md --------------------------------------------------------------------
    model, tok = load_model(name, quantization="4bit")  # nf4, then prepare_model_for_kbit_training
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    # ---------------------------------------------------------------------------------------------
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    print(f"base layers under LoRA: {len(bases)}, all bitsandbytes Linear4bit: "
          f"{all(isinstance(b, bnb.nn.Linear4bit) for b in bases)} ({bases[0].weight.quant_type})")
    trainable = lora_state(model)
    dtypes = sorted({str(p.dtype) for p in trainable.values()})
    print(f"LoRA params: {len(trainable)} tensors, dtypes {dtypes}")
    callback = lora_cl.ContinualCallback()
    for domain, texts in DOMAINS.items():
        before = lora_state(model)
        args = TrainingArguments(output_dir=f"{out}/{domain}", max_steps=3, logging_steps=1,
                                 per_device_train_batch_size=2, report_to=[], save_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok, texts),
                          optimizers=(optimizer, None))
        lora_cl.attach(trainer, callback)
        callback.set_domain(domain)
        trainer.train()
        moved = max((p - before[n]).abs().max().item() for n, p in lora_state(model).items())
        print(f"{domain}: protected domains {optimizer.bank.domains()}, LoRA max |change| {moved:.1e}, "
              f"LoRA changed: {moved > 0}")
    print(optimizer.bank.format_memory_report())


if __name__ == "__main__":
    main()
