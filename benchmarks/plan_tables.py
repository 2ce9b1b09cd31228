"""Memory tables for the five model families at the paper setup, from lora_cl.plan (meta device, no GPU).

    python benchmarks/plan_tables.py [--out docs/memory.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from transformers import Gemma2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

import lora_cl.plan as plan_mod
from lora_cl.plan import GIB, PlanInputs, plan_memory


def families() -> dict[str, tuple[PretrainedConfig, int]]:
    """The public config.json numbers of each base model, and its known parameter count."""
    return {
        "Llama-2-7B": (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                   max_position_embeddings=4096, rms_norm_eps=1e-5), 6_738_415_616),
        "Llama-3-8B": (LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
                       8_030_261_248),
        "Mistral-7B-v0.3": (MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                          max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                                          rms_norm_eps=1e-5), 7_248_023_552),
        "Qwen2.5-7B": (Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                   max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6,
                                   tie_word_embeddings=False), 7_615_616_512),
        "Gemma-2-9B": (Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                    num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                    vocab_size=256000, max_position_embeddings=8192,
                                    query_pre_attn_scalar=256, sliding_window=4096,
                                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                                    tie_word_embeddings=True), 9_241_705_984),
    }


def sharded_families() -> dict[str, tuple[PretrainedConfig, int]]:
    """The larger Llamas of the sharded tables (public config.json numbers, known parameter counts)."""
    return {
        "Llama-2-13B": (LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5), 13_015_864_320),
        "Llama-2-70B": (LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5), 68_976_648_192),
    }


#: The shapes users have: (model, base quantization, GPUs, GiB per GPU, recipe)
SHARDED_SHAPES = (
    ("Llama-2-7B", None, 2, 12, "recipes/llama2-7b-chat-trace.yaml"),
    ("Llama-2-7B", None, 2, 16, "recipes/llama2-7b-chat-trace.yaml"),
    ("Llama-2-13B", None, 2, 24, "recipes/llama2-13b-chat-trace.yaml"),
    ("Llama-2-70B", "4bit", 2, 48, None),
)


def sharded_table(configs: dict[str, PretrainedConfig], paper: PlanInputs) -> list[str]:
    """Per GPU under zero3.json for each of SHARDED_SHAPES, beside one GPU without ZeRO, with the
    planner's first fitting change when the paper setup does not fit, and the commands."""
    out = ["| base | GPUs x GiB | base weights / GPU | total / GPU, zero3.json | fits | one GPU, no ZeRO | "
           "if not: the planner's first change that fits |", "|---|---|---:|---:|---|---:|---|"]
    commands = []
    for name, quant, gpus, mem, recipe in SHARDED_SHAPES:
        inputs = dataclasses.replace(paper, quantization=quant, gpus=gpus, zero_stage=3, gpu_mem_gb=mem)
        p = plan_memory(configs[name], inputs)
        one = plan_memory(configs[name], dataclasses.replace(inputs, gpus=1, zero_stage=0))
        base = gib(rows_by_prefix(p, "base weights"))
        out.append(f"| {name} {quant or 'bf16'} | {gpus} x {mem} | {base} | "
                   f"**{gib(p.total_bytes)}** | {'fits' if p.fits else 'no'} | {gib(one.total_bytes)} | "
                   f"{'' if p.fits else p.advice[0]} |")
        target = recipe or "RECIPE.yaml"
        zero3 = "--set training.deepspeed=deepspeed_configs/zero3.json"
        quant_set = f" --set model.quantization={quant}" if quant else ""
        commands.append(f"lora-cl plan {target} --gpus {gpus} --gpu-mem {mem} {zero3}{quant_set}")
        commands.append(f"torchrun --nproc_per_node {gpus} -m lora_cl.cli train {target} {zero3}{quant_set}")
    return out + ["", "The commands, plan first (the planner reads the recipe's batch and sequence length; "
                  "the rows above use the paper setup):", "", "```bash",
                  *dict.fromkeys(commands), "```"]


def gib(b: int) -> str:
    return f"{b / GIB:.2f}"


def rows_by_prefix(plan, prefix: str) -> int:
    return sum(b for n, b, _ in plan.rows if n.startswith(prefix))


def summary_table(name: str, config: PretrainedConfig, paper: PlanInputs) -> list[str]:
    out = ["| base | states | base weights | LoRA p+g+states | projector (T=8) | activations | "
           "logits+loss | total GiB | 24 GiB | 12 GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for quant in (None, "4bit"):
        for bits in (32, 8):
            inputs = dataclasses.replace(paper, quantization=quant, state_bits=bits)
            p = plan_memory(config, inputs)
            small = plan_memory(config, dataclasses.replace(inputs, gpu_mem_gb=12))
            lora = sum(rows_by_prefix(p, k) for k in ("LoRA params", "LoRA grads", "optimizer states"))
            out.append(f"| {quant or 'bf16'} | {'fp32' if bits == 32 else '8-bit'} | "
                       f"{gib(rows_by_prefix(p, 'base weights'))} | {gib(lora)} | "
                       f"{gib(rows_by_prefix(p, 'subspace'))} | {gib(rows_by_prefix(p, 'activations'))} | "
                       f"{gib(rows_by_prefix(p, 'logits'))} | **{gib(p.total_bytes)}** | "
                       f"{'fits' if p.fits else 'no'} | {'fits' if small.fits else 'no'} |")
            for label, plan in (("24 GiB", p), ("12 GiB", small)):
                if not plan.fits:
                    out.append(f"|  | {label}: | {plan.advice[0]} | | | | | | | |")
    return out


def zero_table(config: PretrainedConfig, paper: PlanInputs) -> list[str]:
    out = ["| config | GPUs | base weights / GPU | LoRA p+g+states / GPU | total / GPU GiB | on CPU GiB |",
           "|---|---:|---:|---:|---:|---:|"]
    setups = [("none (1 GPU)", 1, 0, False), ("DDP, no ZeRO", 4, 0, False), ("zero2.json", 4, 2, False),
              ("zero2_offload.json", 4, 2, True), ("zero3.json", 4, 3, False),
              ("zero3_offload.json", 4, 3, True)]
    for label, gpus, stage, offload in setups:
        p = plan_memory(config, dataclasses.replace(paper, gpus=gpus, zero_stage=stage, offload=offload))
        lora = sum(rows_by_prefix(p, k) for k in ("LoRA params", "LoRA grads", "optimizer states"))
        cpu = sum(b for n, b, _ in p.cpu_rows if not n.startswith("per-domain"))
        out.append(f"| {label} | {gpus} | {gib(rows_by_prefix(p, 'base weights'))} | {gib(lora)} | "
                   f"{gib(p.total_bytes)} | {gib(cpu)} |")
    return out


def render() -> str:
    # the shipped 7-9B recipes train with trl's SFTTrainer, whose fused LM head builds no b*s*V logits
    paper = PlanInputs(lora_r=16, batch_size=4, seq_len=2048, gradient_checkpointing=True, gpu_mem_gb=24,
                       loss="fused")
    fams = families()
    lines = ["# Memory per GPU: 7B-9B LoRA at the paper setup", "",
             "Regenerate with `python benchmarks/plan_tables.py --out docs/memory.md` (meta device, "
             "no GPU, ~10 s). Any other setup: "
             "`python -m lora_cl.plan MODEL_DIR --batch-size 2 --quantization 4bit`.",
             "", "Paper setup: LoRA r=16 on q,k,v,o (fp32 adapters, bf16 autocast), batch 4, seq 2048, "
             "gradient checkpointing on, subspace bases of rank 32 per LoRA tensor and domain, 8 domains, "
             "1 GPU, no ZeRO, the loss through the fused LM head (trl's SFTTrainer, which the shipped "
             "7-9B recipes use, or `training.fused_loss: true` with the plain Trainer). "
             "GiB = 2^30 bytes; a \"24 GB\" card is taken as 24 GiB, with 0.75 GiB "
             "assumed for the CUDA context and allocator slack. These are planner numbers, not "
             "measurements on a GPU.", ""]
    for name, (config, expected) in fams.items():
        p = plan_memory(config, paper)
        if p.n_params != expected:
            sys.exit(f"{name}: counted {p.n_params:,} parameters, expected {expected:,}")
        text = config.get_text_config()
        lines += [f"## {name}", "",
                  f"{p.n_params:,} parameters; LoRA r=16 on q,k,v,o: {p.n_lora_params:,}; "
                  f"hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab {text.vocab_size}.", ""]
        lines += summary_table(name, config, paper) + [""]
        full = plan_memory(config, dataclasses.replace(paper, loss="full"))
        verdict = "fits" if full.fits else "does not fit"
        lines += [f"With the full b*s*V logits instead (the plain Trainer, `training.fused_loss: false`), "
                  f"bf16 base and fp32 states: {gib(rows_by_prefix(full, 'logits'))} GiB for the loss, "
                  f"{gib(full.total_bytes)} GiB in all ({verdict} 24 GiB).", ""]
    llama = fams["Llama-2-7B"][0]
    lines += ["## Full breakdown: Llama-2-7B, bf16 base, 8-bit states, 24 GiB", "",
              plan_memory(llama, dataclasses.replace(paper, state_bits=8)).to_markdown(), "",
              "## ZeRO: Llama-2-7B, bf16 base, fp32 states, 4 GPUs", "",
              "Routed streams run under ZeRO-1/2 and ZeRO-3 with single-process math (see "
              "docs/deepspeed.md); offload is refused for routed methods, so its rows are what the "
              "configs would buy the vanilla baseline.", ""]
    lines += zero_table(llama, paper) + [""]
    big = {name: config for name, (config, _) in {**fams, **sharded_families()}.items()}
    for name, (config, expected) in sharded_families().items():
        counted = plan_memory(config, paper).n_params
        if counted != expected:
            sys.exit(f"{name}: counted {counted:,} parameters, expected {expected:,}")
    lines += ["## Two GPUs, the base sharded (ZeRO-3)", "",
              "The shapes users have, at the paper setup (batch 4 x 2048 per GPU, LoRA r=16 on q,k,v,o, "
              "fp32 states, fused loss): what `zero3.json` leaves on each GPU, and what one GPU would "
              "need. Planner numbers; the sharded path is tested for equality with one process on CPU "
              "(2 gloo ranks), not measured on GPUs. FSDP2 (`--set training.fsdp=true` in place of "
              "`training.deepspeed`) shards the same tensors per parameter, and the planner gives it the "
              "same totals.", ""]
    lines += sharded_table(big, paper) + [""]
    lines += ["## Formulas", "", "Per GPU, summed (an upper bound: the loss peak and the one-layer recompute "
              "do not coincide in time). Parameter counts and LoRA shapes come from the real architecture "
              "built on the meta device (`accelerate.init_empty_weights`, stock `peft.get_peft_model`).", "",
              "- base weights: bf16/fp16 2 B/param; 8-bit (LLM.int8) 1 B/param + fp32 absmax per output row "
              "of every Linear; 4-bit nf4 0.5 B/param + fp32 absmax per 64 (0.5 bit/param; ~0.127 with "
              "double quantization, `double_quant=True`). Embeddings, norms and lm_head are not quantized "
              "and are counted in fp32, because `lora_cl.models.load_model` runs "
              "`peft.prepare_model_for_kbit_training`, which upcasts them.",
              "- LoRA params and grads: fp32, 4 B/param each.",
              "- optimizer states: fp32 m and v 8 B/param; 8-bit blockwise 2 B/param + fp32 absmax per 256 "
              "(tensors under 4096 elements stay fp32, as in bitsandbytes); + one fp32 step per tensor.",
              "- subspace projector: every LoRA tensor with fan_in > k (k = 32: the lora_A matrices) keeps "
              "fan_in x k fp32 per domain on the CPU (`SubspaceBank`); the merged projector on the GPU has "
              "min(fan_in, k*T) columns plus their weights after T domains.",
              "- ZeRO over N GPUs: stage 1 divides the optimizer states by N, stage 2 also the grads, "
              "stage 3 also the base weights and LoRA params (plus two gathered decoder layers); offload "
              "puts the "
              "optimizer states (and under stage 3 the parameters) on the CPU.", "",
              "Activations, from the `lora_cl.plan` docstring (checked against the bytes autograd saves "
              "for a small Llama on CPU in `tests/test_plan.py`, within 5%):", "", "```",
              *[ln[4:] for ln in plan_mod.__doc__.split("as measured with saved-tensor hooks")[1]
                .splitlines()[2:] if ln.strip()], "```", "",
              "With the full logits the loss row dominates for large vocabularies (Llama-3, Qwen2.5, "
              "Gemma-2): transformers upcasts all b*s*V logits to fp32 for the cross-entropy. The fused "
              "LM head (trl's chunked log-probabilities: vocabulary tiles folded into an online "
              "logsumexp, recomputed in backward) removes it; `lora-cl plan` picks the row from the "
              "recipe (`training.trainer: sft`, or `training.fused_loss`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown here instead of stdout")
    args = parser.parse_args()
    text = render()
    if args.out:
        from lora_cl.paths import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
