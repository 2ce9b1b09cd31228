"""Basis building at a domain's end, as a fraction of that domain's training time.

SmolLM2-135M + LoRA r=8 on q,k,v,o, one real Debian domain trained through the HF Trainer with
ContinualCallback, for each basis source lora-cl ships: "gradient" (ogp: rank-32 SVD of the last
256 raw-gradient rows per tensor), "activation" (gpm: layer inputs of 64 examples, 97% energy;
forwards at the domain's end, or with ``activation_sample="last_steps"`` sampled by hooks from
the domain's last training forwards, whose own time counts as build time) and "adapter" (the
learned dW = scaling * B A). The callback times the build itself (``basis_build_seconds``); the
domain's step time is the median interval between optimizer
steps. The fraction is reported at the demo's 16 steps per domain and the reproduction's 80,
with the number of steps from which it falls under 5%.

    python benchmarks/basis_build.py [--steps 12] [--json docs/performance/basis_build.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import lora_cl
from lora_cl.data.examples import load_domain, pad_collate
from lora_cl.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_step import StepClock, write_result  # noqa: E402

#: label -> (preset, overrides)
SOURCES = {
    "gradient (ogp)": ("ogp", {}),
    "activation (gpm)": ("gpm", {}),
    "adapter (ogp, basis=adapter)": ("ogp", {"basis": "adapter"}),
    # GPM's layer inputs sampled by hooks from the domain's last training forwards: no forward at the
    # end; the callback's build time is the hooks' own time plus the decomposition
    "activation (gpm, activation_sample=last_steps)": ("gpm", {"activation_sample": "last_steps"}),
}
TARGET = 0.05


def sample_forward_seconds(model: torch.nn.Module, train: Any, tok: Any, optimizer: Any, batch: int) -> float:
    """Seconds of no-grad forwards of exact GPM's sample (the method's ``basis_examples`` examples of
    ``train``, in batches of ``batch``) through the decoder body alone (no LM head): what any
    activation basis of those examples must run, before sampling or decomposition."""
    from lora_cl.trainer.optimizer_factory import method_of
    from lora_cl.trainer.replay import collate_chunks, seeded_subset

    spec = method_of(optimizer)
    idx = seeded_subset(len(train), spec.basis_examples, 0)
    batches = collate_chunks([train[i] for i in idx], pad_collate(tok), batch)
    body = model.get_base_model().model
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            start = time.perf_counter()
            for b in batches:
                body(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            return time.perf_counter() - start
    finally:
        body.train(was)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--source", default="debian:austen", help="the domain trained and decomposed")
    args = ap.parse_args()

    base, tok = load_model(args.model)
    data = load_domain(args.source, tok, seq_len=args.seq, eval_examples=2)
    out = tempfile.mkdtemp(prefix="lora-cl-bench-")
    rows = {}
    for label, (preset, overrides) in SOURCES.items():
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        optimizer = lora_cl.make_optimizer(model, preset, lr=2e-4, **overrides)
        callback, clock = lora_cl.ContinualCallback(probe_every=0), StepClock()
        targs = TrainingArguments(output_dir=f"{out}/{preset}", max_steps=args.steps, learning_rate=2e-4,
                                  per_device_train_batch_size=args.batch, logging_steps=5, report_to=[],
                                  save_strategy="no", use_cpu=not torch.cuda.is_available(),
                                  disable_tqdm=True, remove_unused_columns=False, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data.train,
                          data_collator=pad_collate(tok), optimizers=(optimizer, None))
        lora_cl.attach(trainer, callback)
        trainer.add_callback(clock)
        callback.set_domain("austen")
        trainer.train()
        build = callback.basis_build_seconds["austen"]
        step = statistics.median(clock.times)
        rows[label] = {
            "build_seconds": build, "step_seconds": step, "bases": callback.bases_added["austen"],
            "bank_mib": optimizer.bank.memory_report()["total_bytes"] / 2**20,
            "fraction_at_16_steps": build / (16 * step), "fraction_at_80_steps": build / (80 * step),
            "steps_for_5_percent": math.ceil(build / (TARGET * step)),
        }
        if preset == "gpm" and "activation_sample" not in overrides:
            # exact GPM's floor: the forwards of its sample (basis_examples examples in the
            # Trainer's batch size) through the decoder body, whose layers hold every LoRA input
            floor = sample_forward_seconds(model, data.train, tok, optimizer, args.batch)
            rows[label]["floor_seconds"] = floor
            rows[label]["floor_fraction_at_80_steps"] = floor / (80 * step)
        print(f"{label}: build {build:.2f} s, step {step:.2f} s, "
              f"{rows[label]['fraction_at_80_steps']:.1%} of an 80-step domain", flush=True)
        base = model.unload()  # the bare base model again for the next source
    result = {"benchmark": "basis_build", "model": args.model, "source": args.source, "seq": args.seq,
              "batch": args.batch,
              "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "load_avg_1min_end": os.getloadavg()[0], "target": TARGET, "sources": rows}
    print(json.dumps(result, indent=1))
    write_result(args.json, result)


if __name__ == "__main__":
    main()
