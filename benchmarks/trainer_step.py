"""Trainer step time: lora-cl (ContinualCallback + RoutedAdamW ogp) vs peft + AdamW(fused).

The same HF Trainer, model (SmolLM2-135M + LoRA r=8 on q,k,v,o), data (real Debian text) and
batch for both. lora-cl runs the stream's second domain, so its bank holds the first domain's
rank-32 gradient bases: projection, the overlap-adaptive strength, gradient-row collection,
alpha/overlap logging and the periodic probes all run. Rounds alternate (A B A B ...) so machine
noise hits both alike; a step's time is the interval between consecutive ``on_step_end`` events
(forward, backward, optimizer, logging), the first step of each round left out.

    python benchmarks/trainer_step.py [--rounds 4] [--steps 9] [--json docs/performance/trainer_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import lora_cl
from lora_cl.data.examples import load_domain, pad_collate
from lora_cl.models import load_model

BASELINE = "peft + torch AdamW(fused) (optim=adamw_torch_fused)"
ROUTED = "lora-cl: ContinualCallback + RoutedAdamW(ogp), 1 old domain in the bank"


class StepClock(TrainerCallback):
    """Seconds between consecutive optimizer steps (the first step of a train() is left out)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=9, help="steps per round (the first is not timed)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--old", default="debian:austen", help="the first domain (its bases fill the bank)")
    ap.add_argument("--new", default="debian:kjv", help="the domain the steps are timed on")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    old = load_domain(args.old, tok, seq_len=args.seq, eval_examples=2)
    new = load_domain(args.new, tok, seq_len=args.seq, eval_examples=2)
    out = tempfile.mkdtemp(prefix="lora-cl-bench-")
    collate = pad_collate(tok)

    def targs(tag: str, steps: int, **extra) -> TrainingArguments:  # noqa: ANN003
        return TrainingArguments(output_dir=f"{out}/{tag}", max_steps=steps, learning_rate=2e-4,
                                 per_device_train_batch_size=args.batch, logging_steps=5,
                                 report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                                 disable_tqdm=True, remove_unused_columns=False, seed=0, **extra)

    optimizer = lora_cl.make_optimizer(model, "ogp", lr=2e-4)
    callback = lora_cl.ContinualCallback()

    def routed_round(tag: str, data, steps: int, clock: StepClock | None) -> None:  # noqa: ANN001
        trainer = Trainer(model=model, args=targs(tag, steps), train_dataset=data.train,
                          data_collator=collate, optimizers=(optimizer, None))
        lora_cl.attach(trainer, callback)
        if clock is not None:
            trainer.add_callback(clock)
        callback.set_domain(tag)
        trainer.train()

    routed_round("old", old, 24, None)  # the previous domain: its bases go into the bank
    bank = optimizer.bank
    print(f"bank after the old domain: {bank.format_memory_report().splitlines()[0]}", flush=True)

    clocks = {BASELINE: StepClock(), ROUTED: StepClock()}
    for r in range(args.rounds):
        trainer = Trainer(model=model, args=targs(f"base{r}", args.steps, optim="adamw_torch_fused"),
                          train_dataset=new.train, data_collator=collate, callbacks=[clocks[BASELINE]])
        trainer.train()
        routed_round(f"new{r}", new, args.steps, clocks[ROUTED])
        bank.drop_domain(f"new{r}")  # every round starts from the same one-domain bank
        print(f"round {r + 1}/{args.rounds}: median s/step base "
              f"{statistics.median(clocks[BASELINE].times):.3f}, lora-cl "
              f"{statistics.median(clocks[ROUTED].times):.3f}", flush=True)

    med = {k: statistics.median(c.times) for k, c in clocks.items()}
    paired = [a / b for a, b in zip(clocks[ROUTED].times, clocks[BASELINE].times)]
    result = {
        "benchmark": "trainer_step", "model": args.model, "seq": args.seq, "batch": args.batch,
        "rounds": args.rounds, "steps_per_round": args.steps, "domains": [args.old, args.new],
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "load_avg_1min_end": os.getloadavg()[0],
        "step_seconds": {k: c.times for k, c in clocks.items()},
        "median_seconds": med,
        "overhead": med[ROUTED] / med[BASELINE] - 1.0,
        "paired_ratio_quartiles": statistics.quantiles(paired, n=4),
        "last_alpha": optimizer.metrics().get("projection/alpha"),
        "bank_domains": bank.domains(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=1))
    write_result(args.json, result)


def write_result(path: str | None, result: dict) -> None:
    """The benchmark's JSON for benchmarks/performance.py (nothing when ``path`` is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
