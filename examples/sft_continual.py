"""Continual instruction tuning with trl's SFTTrainer: prompt/completion tasks, one after another.

    python examples/sft_continual.py [MODEL] [METHOD]   # defaults: smollm2-135m, ogp

MODEL also comes from $LORA_CL_MODEL. SFTTrainer masks the prompt tokens (completion-only loss);
lora-cl only supplies the optimizer and the callback. This is docs/guides/sft.md, runnable.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

import lora_cl
from lora_cl.models import load_model

TASKS = {
    "capitals": [("What is the capital of France?", " Paris."), ("What is the capital of Japan?", " Tokyo."),
                 ("What is the capital of Italy?", " Rome."), ("What is the capital of Peru?", " Lima.")],
    "arithmetic": [("What is two plus two?", " Four."), ("What is three times three?", " Nine."),
                   ("What is ten minus one?", " Nine."), ("What is five plus five?", " Ten.")],
    "colours": [("What colour is grass?", " Green."), ("What colour is snow?", " White."),
                ("What colour is coal?", " Black."), ("What colour is the sky?", " Blue.")],
}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORA_CL_MODEL", "smollm2-135m")
    method = sys.argv[2] if len(sys.argv) > 2 else "ogp"
    out = tempfile.mkdtemp(prefix="lora-cl-sft-")

    model, tok = load_model(name)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = lora_cl.make_optimizer(model, method, lr=1e-3)
    callback = lora_cl.ContinualCallback()
    for task, pairs in TASKS.items():
        data = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
        args = SFTConfig(output_dir=f"{out}/{task}", max_steps=4, per_device_train_batch_size=2,
                         max_length=64, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             optimizers=(optimizer, None))
        lora_cl.attach(trainer, callback)
        callback.set_domain(task)
        result = trainer.train()
        print(f"{task}: train loss {result.training_loss:.3f}; finished {callback.domains}; "
              f"{optimizer.metrics()}")


if __name__ == "__main__":
    main()
