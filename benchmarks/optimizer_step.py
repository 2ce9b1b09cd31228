"""Optimizer step time on 7B-shaped LoRA tensors, as ratios to the fastest torch AdamW.

LoRA r=16 on q,k,v,o of 32 layers, hidden 4096: 256 tensors, 16.8M parameters. Every
variant is timed in interleaved rounds (A B C A B C ...) so machine noise hits all alike;
we report the median per-step time and its ratio to the fastest torch.optim.AdamW variant
measured in the same run, with the interquartile range.

    python benchmarks/optimizer_step.py [--rounds 7] [--steps 5] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lora_cl import OverlapAdaptiveStrength, Projection, RoutedAdamW, SubspaceBank


def lora_tensors(layers: int, hidden: int, r: int, device: str) -> tuple[list[str], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    names, params = [], []
    for layer in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base = f"model.layers.{layer}.self_attn.{proj}"
            a = (torch.randn(r, hidden, generator=gen) * 0.01).to(device).requires_grad_()
            b = torch.zeros(hidden, r, device=device).requires_grad_()
            names += [f"{base}.lora_A.default.weight", f"{base}.lora_B.default.weight"]
            params += [a, b]
    return names, params


def bank_for(names: list[str], params: list[torch.Tensor], rank: int) -> SubspaceBank:
    """Rank-`rank` bases on every tensor whose fan-in exceeds the rank (LoRA A here)."""
    gen = torch.Generator().manual_seed(1)
    bank = SubspaceBank()
    for name, p in zip(names, params):
        if p.shape[-1] > rank:
            q, _ = torch.linalg.qr(torch.randn(p.shape[-1], rank, generator=gen))
            bank.add("previous", name, q)
    return bank


def variants(names, params, rank, device) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    groups = [{"params": params, "param_names": names}]
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch AdamW fused=True": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True),
        "torch AdamW foreach=True": lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "torch AdamW single-tensor": lambda: torch.optim.AdamW(params, lr=1e-4, foreach=False),
        "RoutedAdamW decoupled, no modifier (fused path)":
            lambda: RoutedAdamW(groups, lr=1e-4, impl="fused"),
        "RoutedAdamW decoupled, no modifier (reference path)":
            lambda: RoutedAdamW(groups, lr=1e-4, impl="reference"),
    }
    bank = bank_for(names, params, rank)
    out[f"RoutedAdamW decoupled + rank-{rank} projection, overlap-adaptive (fused path)"] = (
        lambda: RoutedAdamW(groups, lr=1e-4, impl="fused",
                            modifiers=[Projection(bank, OverlapAdaptiveStrength())])
    )
    return out


def time_steps(opt: torch.optim.Optimizer, params, grads, steps: int, device: str) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # state init outside the timing
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rank", type=int, default=32, help="projection basis rank")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write a markdown section here")
    args = ap.parse_args()

    names, params = lora_tensors(args.layers, args.hidden, args.r, args.device)
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(2)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(args.device) for p in params]
    makers = variants(names, params, args.rank, args.device)
    print(f"{len(params)} LoRA tensors, {n_params / 1e6:.1f}M params, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    times: dict[str, list[float]] = {k: [] for k in makers}
    for rnd in range(args.rounds):
        for key, make in makers.items():
            times[key].append(time_steps(make(), params, grads, args.steps, args.device))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    torch_keys = [k for k in times if k.startswith("torch")]
    fastest = min(torch_keys, key=lambda k: statistics.median(times[k]))
    base = statistics.median(times[fastest])
    lines = [
        f"Setup: {len(params)} LoRA tensors (r={args.r} on q,k,v,o of {args.layers} layers, hidden "
        f"{args.hidden}), {n_params:,} parameters; device `{args.device}` "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; {args.rounds} interleaved rounds x {args.steps} steps. "
        f"Baseline = fastest torch AdamW in this run: **{fastest}**.",
        "",
        "| optimizer | median ms/step | IQR ms | ratio to baseline |",
        "|---|---|---|---|",
    ]
    for key, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        lines.append(f"| {key} | {1e3 * statistics.median(ts):.1f} | {1e3 * q[0]:.1f}-{1e3 * q[2]:.1f} | "
                     f"{statistics.median(ts) / base:.2f}x |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Optimizer step time\n\nRegenerate with `python benchmarks/optimizer_step.py "
                    f"--out {args.out}` (or `make bench`).\n\n{text}\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
