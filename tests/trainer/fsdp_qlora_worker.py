"""Worker for test_fsdp_stream.py: what FSDP2 shards, and what each rank holds.

tiny.yaml with ``training.fsdp: true`` (and ``model.quantization: 4bit`` when the second argument
is ``4bit``), 2 ranks: the runner's own model loading (4-bit weights packed in the model's dtype
under FSDP2) and the first domain's Trainer for 2 steps. Rank 0 writes each base weight's and LoRA
tensor's type, shape and local shape; every rank writes the bytes of its local shards, frozen
and trainable (``rank<r>_bytes.json`` beside the output).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from lora_cl.recipe import load_recipe
from lora_cl.trainer.optimizer_factory import make_optimizer
from lora_cl.trainer.stream import load_peft_model, load_stream_data
from lora_cl.trainer.trainers import make_trainer


def main() -> None:
    out = Path(sys.argv[1])
    quant = ["model.quantization=4bit"] if sys.argv[2:] == ["4bit"] else []
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "tiny.yaml", overrides=[
        *quant, "training.fsdp=true", "training.batch_size=1", "data.train_examples=8"])
    data, _ = load_stream_data(recipe)
    model, tokenizer = load_peft_model(recipe)
    optimizer = make_optimizer(model, "ogp", lr=1e-3)
    trainer = make_trainer(recipe, model, tokenizer, optimizer, data[0], out.parent / "run", steps=2,
                           seed=0, progress=False)
    trainer.train()
    rows = {n: {"type": type(p).__name__, "shape": list(p.shape),
                "local": list(p.to_local().shape) if hasattr(p, "to_local") else None}
            for n, p in trainer.model.named_parameters() if "base_layer" in n or "lora_" in n}
    held = {"frozen": 0, "trainable": 0}
    for p in trainer.model.parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p
        held["trainable" if p.requires_grad else "frozen"] += shard.numel() * shard.element_size()
    (out.parent / f"rank{dist.get_rank()}_bytes.json").write_text(json.dumps(held))
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (no C++ teardown at interpreter exit: see tests/optim/fsdp2_worker.py)


if __name__ == "__main__":
    main()
