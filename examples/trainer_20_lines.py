"""Continual LoRA with a plain transformers.Trainer: one optimizer, one callback, one train() per domain.

    python examples/trainer_20_lines.py [MODEL]      # MODEL: smollm2-135m (default), tiny, a dir, a hub id

The model name also comes from $LORA_CL_MODEL. This is docs/guides/trainer.md, runnable.
"""

from __future__ import annotations

import os
import sys
import tempfile

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


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORA_CL_MODEL", "smollm2-135m")
    out = tempfile.mkdtemp(prefix="lora-cl-trainer-")
    # --- the ~20 lines of docs/guides/trainer.md ---------------------------------------------
    model, tok = load_model(name)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)  # decoupled routing, adaptive alpha
    callback = lora_cl.ContinualCallback()                    # one of each for the whole stream
    for domain, texts in DOMAINS.items():
        args = TrainingArguments(output_dir=f"{out}/{domain}", max_steps=4, logging_steps=1,
                                 per_device_train_batch_size=2, report_to=[], save_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok, texts),
                          optimizers=(optimizer, None))        # hand our optimizer over
        lora_cl.attach(trainer, callback)                       # callback first in line
        callback.set_domain(domain)                             # name what train() runs
        trainer.train()                                         # bases built at its end
        print(f"{domain}: protected domains {optimizer.bank.domains()}, "
              f"alpha {optimizer.metrics().get('projection/alpha')}")
    # ------------------------------------------------------------------------------------------
    print(optimizer.bank.format_memory_report())


if __name__ == "__main__":
    main()
