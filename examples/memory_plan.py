"""Plan memory per GPU for Llama-2-7B LoRA training, offline: no weights, no GPU (meta device).

    python examples/memory_plan.py [RECIPE]      # default: recipes/llama2-7b-chat-trace.yaml

The recipe's model.architecture holds the model's config.json numbers, so nothing is downloaded.
Two setups: a bf16 base on a 24 GiB card and a 4-bit (nf4) base on a 12 GiB card. This is
docs/guides/memory-planning.md, runnable; `lora-cl plan RECIPE` prints the same tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_cl.plan import GIB, PlanInputs, plan_memory
from lora_cl.recipe import load_recipe, model_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "recipes" / "llama2-7b-chat-trace.yaml")
    recipe = load_recipe(path)
    config = model_config(recipe)  # a transformers config; the planner builds the model on meta
    # the guide's setup; trl's SFTTrainer (training.trainer: sft) never builds the b x s x V logits
    loss = "fused" if recipe.training.fused_head else "full"
    common = dict(lora_r=16, batch_size=4, seq_len=2048, gradient_checkpointing=True, loss=loss)
    setups = {"bf16 base, 24 GiB": PlanInputs(**common, quantization=None, gpu_mem_gb=24),
              "4-bit base, 12 GiB": PlanInputs(**common, quantization="4bit", gpu_mem_gb=12)}
    verdicts = []
    for label, inputs in setups.items():
        plan = plan_memory(config, inputs)
        print(f"== {recipe.model.name}, {label} ({plan.n_params:,} params, "
              f"{plan.n_lora_params:,} LoRA) ==")
        print(plan.to_text(), end="\n\n")
        verdicts.append(f"verdict: {label}: {plan.total_bytes / GIB:.2f} GiB of {inputs.gpu_mem_gb:.0f} GiB, "
                        f"{'fits' if plan.fits else 'does NOT fit'}"
                        + ("" if plan.fits else f"; e.g. {plan.advice[0]}"))
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
