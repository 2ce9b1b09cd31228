"""GPU check: a Llama-2-7B-shaped model on one GPU, measured against the memory planner.

    python benchmarks/gpu_7b.py --out docs/gpu.md [--steps 6] [--layers 32] [--skip-qlora]

Randomly initialised (no hub download) Llama-2-7B architecture in bf16, LoRA r=16 on q,k,v,o,
RoutedAdamW running ``ogp`` with 8-bit states and rank-32 bases for 7 earlier domains, gradient
checkpointing, seq 2048, batch 4. Reports the peak CUDA memory next to ``lora_cl.plan`` and
tokens/s next to peft + ``torch.optim.AdamW(fused=True)`` on the same model (interleaved, median),
then the same for a 4-bit (QLoRA) base. ``--layers`` shrinks the depth for a smoke run. Exits 0
with a message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

SEQ, BATCH, RANK, BASIS_RANK, EARLIER = 2048, 4, 16, 32, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama2_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(config, quantization: str | None):
    """The model on the GPU (bf16, or 4-bit through a save/load round trip) with LoRA applied."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization is None:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:  # bitsandbytes quantizes at load time: write random bf16 weights to disk once
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lora-cl-gpu7b-") as tmp:
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map={"": 0},
                                                         dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    return model


def routed_optimizer(model):
    """RoutedAdamW(ogp), 8-bit states, bank holding rank-32 bases of 7 earlier domains."""
    import lora_cl
    from lora_cl.subspace import SubspaceBank

    spec = lora_cl.resolve_method("ogp")
    bank = SubspaceBank(mode=spec.bank_mode, max_rank=None)
    opt = lora_cl.make_optimizer(model, spec, lr=1e-4, bank=bank, state_bits=8)
    gen = torch.Generator().manual_seed(0)
    for name, p in zip(*opt.routed_named_params(), strict=True):
        fan_in = p.shape[1]
        if fan_in <= BASIS_RANK:
            continue
        for d in range(EARLIER):
            q, _ = torch.linalg.qr(torch.randn(fan_in, BASIS_RANK, generator=gen))
            bank.add(f"earlier{d}", name, q)
    opt.start_domain("current")
    return opt


def train_steps(model, opt, steps: int, vocab: int) -> list[float]:
    """Seconds per optimizer step (after one warm-up step)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, (BATCH, SEQ), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return times


def measure(config, quantization: str | None, steps: int) -> dict:
    from lora_cl.plan import PlanInputs, plan_memory

    results = {}
    for label in ("lora-cl ogp, 8-bit states", "peft + AdamW(fused)"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build(config, quantization)
        if label.startswith("lora-cl"):
            opt = routed_optimizer(model)
        else:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                    fused=True)
        times = train_steps(model, opt, steps, config.vocab_size)
        results[label] = {"median_s": statistics.median(times), "min_s": min(times),
                          "max_s": max(times), "tokens_per_s": BATCH * SEQ / statistics.median(times),
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        del model, opt
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(config, PlanInputs(lora_r=RANK, lora_targets=tuple(TARGETS), quantization=quantization,
                                          batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=True,
                                          state_bits=8, basis_rank=BASIS_RANK, n_domains=EARLIER + 1,
                                          gpu_mem_gb=gpu_gib, loss="full"))  # model(labels=...) above
    results["plan_gib"] = plan.total_bytes / 2**30
    return results


def to_markdown(rows: dict, args: argparse.Namespace) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [f"# GPU check (generated by `python benchmarks/gpu_7b.py --out {args.out} --steps {args.steps}"
             f"{' --layers ' + str(args.layers) if args.layers != 32 else ''}`)", "",
             f"Device: {props.name}, {props.total_memory / 2**30:.1f} GiB; torch {torch.__version__}. "
             f"Llama-2-7B shape ({args.layers} layers), random weights, LoRA r={RANK} on q,k,v,o, batch "
             f"{BATCH} x seq {SEQ}, gradient checkpointing, {args.steps} timed steps after one warm-up.",
             "", "| base | optimizer | tokens/s | step median (s) | peak allocated (GiB) | "
             "reserved (GiB) | planner (GiB) | peak / plan |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for base, res in rows.items():
        for label, r in res.items():
            if label == "plan_gib":
                continue
            lines.append(f"| {base} | {label} | {r['tokens_per_s']:.0f} | {r['median_s']:.3f} | "
                         f"{r['peak_gib']:.2f} | {r['reserved_gib']:.2f} | {res['plan_gib']:.2f} | "
                         f"{r['peak_gib'] / res['plan_gib']:.2f} |")
        ours, ref = res["lora-cl ogp, 8-bit states"], res["peft + AdamW(fused)"]
        lines.append(f"| {base} | step-time ratio lora-cl / AdamW(fused) | | "
                     f"{ours['median_s'] / ref['median_s']:.3f}x | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/gpu.md")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-qlora", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_7b.py: no CUDA device here; nothing measured (run it on a GPU)")
        return 0
    config = llama2_7b_config(args.layers)
    rows = {"bf16": measure(config, None, args.steps)}
    if not args.skip_qlora:
        rows["4-bit nf4"] = measure(config, "4bit", args.steps)
    text = to_markdown(rows, args)
    print(text)
    from lora_cl.paths import atomic_write_text

    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
