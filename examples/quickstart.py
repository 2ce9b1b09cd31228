"""The README quickstart, runnable: two domains of real text, ogp-style routing.

    python examples/quickstart.py [--model smollm2-135m|tiny] [--steps 10]
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

from lora_cl import (
    GradientRowBuffer,
    OverlapAdaptiveStrength,
    Projection,
    RoutedAdamW,
    SubspaceBank,
    param_groups,
)
from lora_cl.models import load_model

DOMAINS = {
    "license": "Licensed under the Apache License, Version 2.0; you may not use this file except "
               "in compliance with the License. Unless required by applicable law or agreed to in "
               "writing, software distributed under the License is distributed on an AS IS BASIS.",
    "python": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
              "    return a\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
}


def batches(tok, text: str, steps: int, seq: int = 32):
    ids = tok(text, return_tensors="pt").input_ids[0]
    for step in range(steps):
        start = (step * 7) % max(1, len(ids) - seq)
        chunk = ids[start:start + seq].unsqueeze(0)
        yield {"input_ids": chunk, "labels": chunk}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    bank, rows = SubspaceBank(), GradientRowBuffer(rank=8, max_rows=64)
    opt = RoutedAdamW(param_groups(model), lr=1e-3, routing="decoupled",
                      modifiers=[rows, Projection(bank, OverlapAdaptiveStrength(alpha_max=0.5))])
    model.train()
    for domain, text in DOMAINS.items():
        opt.start_domain(domain)
        for batch in batches(tok, text, args.steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        opt.end_domain(domain)
        added = rows.build(bank, domain)
        print(f"{domain}: last loss {loss.item():.3f}, {added} bases added, "
              f"metrics {opt.metrics()}")
    print(bank.format_memory_report())


if __name__ == "__main__":
    main()
