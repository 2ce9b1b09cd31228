"""GPU check: a Llama-2-7B-shaped model on one GPU, measured against the memory planner.

    python benchmarks/gpu_7b.py --out docs/gpu.md [--json docs/gpu/gpu_7b.json] [--steps 6]
                                [--layers 32] [--skip-qlora]
    python benchmarks/gpu_7b.py --tiny --device cpu --out /tmp/gpu.md   # the whole flow, small, on CPU

Randomly initialised (no hub download) Llama-2-7B architecture in bf16, LoRA r=16 on q,k,v,o,
RoutedAdamW running ``ogp`` with 8-bit states and rank-32 bases for 7 earlier domains, gradient
checkpointing, seq 2048, batch 4. Reports the peak CUDA memory next to ``lora_cl.plan`` and
tokens/s next to peft + ``torch.optim.AdamW(fused=True)`` on the same model (interleaved, median),
then the same for a 4-bit (QLoRA) base. ``--layers`` shrinks the depth; ``--tiny`` shrinks every
dimension (for a smoke run of the whole flow, on CPU too). Without CUDA and without ``--device
cpu`` it exits 0 with a message.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

SEQ, BATCH, RANK, BASIS_RANK, EARLIER = 2048, 4, 16, 32, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


TINY = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4}
TINY_SEQ, TINY_BATCH = 64, 2


def llama2_7b_config(layers: int, tiny: bool = False):
    from transformers import LlamaConfig

    dims = TINY if tiny else {"hidden_size": 4096, "intermediate_size": 11008,
                              "num_attention_heads": 32, "num_key_value_heads": 32}
    return LlamaConfig(**dims, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def save_random(config, folder: str) -> None:
    """Random bf16 weights written once, so bitsandbytes can quantize them at load time."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init is much faster on a GPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model


def build(config, saved: str | None, device: str):
    """The model (bf16, or 4-bit loaded from the random checkpoint ``saved``) with LoRA applied."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if saved is None:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0 if device == "cuda" else device})
        model = prepare_model_for_kbit_training(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode, and transformers checkpoints activations only
    # in train mode (the Trainer calls train(); this loop must too).
    model.train()
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(model, opt, steps: int, vocab: int, shape: tuple[int, int], device: str) -> list[float]:
    """Seconds per optimizer step (after one warm-up step); raises on a non-finite loss."""
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, shape, device=device, generator=gen)
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {i}")
    return times


def measure(config, quantization: str | None, steps: int, device: str, shape: tuple[int, int]) -> dict:
    import tempfile

    from lora_cl.plan import PlanInputs, plan_memory

    results = {}
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="lora-cl-gpu7b-") as tmp:
        if quantization is not None:
            save_random(config, tmp)
        for label in ("lora-cl ogp, 8-bit states", "peft + AdamW(fused)"):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = build(config, tmp if quantization is not None else None, device)
            if label.startswith("lora-cl"):
                opt = routed_optimizer(model)
            else:
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                        fused=True)
            times = train_steps(model, opt, steps, config.vocab_size, shape, device)
            median = statistics.median(times)
            results[label] = {"median_s": median, "min_s": min(times), "max_s": max(times),
                              "tokens_per_s": shape[0] * shape[1] / median,
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
            del model, opt
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
    plan = plan_memory(config, PlanInputs(lora_r=RANK, lora_targets=tuple(TARGETS), quantization=quantization,
                                          batch_size=shape[0], seq_len=shape[1], gradient_checkpointing=True,
                                          state_bits=8, basis_rank=BASIS_RANK, n_domains=EARLIER + 1,
                                          gpu_mem_gb=gpu_gib, loss="full"))  # model(labels=...) above
    results["plan_gib"] = plan.total_bytes / 2**30
    return results


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def to_markdown(rows: dict, args: argparse.Namespace, shape: tuple[int, int]) -> str:
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    else:
        where = f"{args.device} (no CUDA memory figures)"
    flags = (f"{' --layers ' + str(args.layers) if args.layers != 32 else ''}"
             f"{' --tiny' if args.tiny else ''}{' --device ' + args.device if args.device != 'cuda' else ''}"
             f"{' --skip-bf16' if args.skip_bf16 else ''}{' --skip-qlora' if args.skip_qlora else ''}")
    lines = [f"# GPU check (generated by `python benchmarks/gpu_7b.py --out {args.out} --steps {args.steps}"
             f"{flags}`)", "",
             f"Device: {where}; torch {torch.__version__}. "
             f"Llama-2-7B {'architecture shrunk by --tiny' if args.tiny else 'shape'} "
             f"({args.layers} layers), "
             f"random weights, LoRA r={RANK} on q,k,v,o, batch {shape[0]} x seq {shape[1]}, gradient "
             f"checkpointing, {args.steps} timed steps after one warm-up.",
             "", "| base | optimizer | tokens/s | step median (s) | peak allocated (GiB) | "
             "reserved (GiB) | planner (GiB) | peak / plan |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for base, res in rows.items():
        for label, r in res.items():
            if label == "plan_gib":
                continue
            ratio = "n/a" if r["peak_gib"] is None else f"{r['peak_gib'] / res['plan_gib']:.2f}"
            lines.append(f"| {base} | {label} | {r['tokens_per_s']:.0f} | {r['median_s']:.3f} | "
                         f"{_gib(r['peak_gib'])} | {_gib(r['reserved_gib'])} | {res['plan_gib']:.2f} | "
                         f"{ratio} |")
        ours, ref = res["lora-cl ogp, 8-bit states"], res["peft + AdamW(fused)"]
        lines.append(f"| {base} | step-time ratio lora-cl / AdamW(fused) | | "
                     f"{ours['median_s'] / ref['median_s']:.3f}x | | | | |")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/gpu.md")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-qlora", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true", help="measure the 4-bit nf4 model only")
    parser.add_argument("--tiny", action="store_true", help="small dimensions: a smoke run of the flow")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--note", default="",
                        help="a sentence added under the table (e.g. what shared the GPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_7b.py: no CUDA device here; nothing measured (run it on a GPU, or pass "
              "--tiny --device cpu for a smoke run)")
        return 0
    config = llama2_7b_config(args.layers, args.tiny)
    shape = (TINY_BATCH, TINY_SEQ) if args.tiny else (BATCH, SEQ)
    rows = {} if args.skip_bf16 else {"bf16": measure(config, None, args.steps, args.device, shape)}
    print(json.dumps(rows), flush=True)
    if not args.skip_qlora:
        rows["4-bit nf4"] = measure(config, "4bit", args.steps, args.device, shape)
    text = to_markdown(rows, args, shape)
    print(text)
    from lora_cl.paths import atomic_write_text

    atomic_write_text(args.out, text)
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": args.device, "torch": torch.__version__,
                                                 "layers": args.layers, "tiny": args.tiny,
                                                 "shape": list(shape), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
