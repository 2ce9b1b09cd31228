"""Numerical parity of RoutedAdamW on an accelerator (the CPU test suite's claims, on CUDA).

    python benchmarks/gpu_parity.py --out docs/gpu_parity.md [--json FILE] [--device cuda|cpu]

Checks, each on the chosen device, on LoRA-shaped tensors with fixed random gradients:

1. routing off (and every routing with no modifier) against ``torch.optim.AdamW`` with the same
   kernel family: ``impl="fused"`` vs ``fused=True``, ``impl="reference"`` vs ``foreach=False``;
   30 steps, max |difference| of the parameters (0 means bitwise equal);
2. 8-bit states against ``bitsandbytes.optim.AdamW8bit``: 100 steps, max |difference| and the
   difference's norm relative to the distance travelled;
3. decoupled projection (``ogp-fixed``-style, rank-8 bases) on the device against the same run on
   the CPU: 30 steps, max relative difference.

Without CUDA and without ``--device cpu`` it exits 0 with a message.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = [(16, 4096), (4096, 16), (8, 576), (576, 8), (1000, 17)]
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_params(device: str, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen) * 0.1).to(device=device, dtype=dtype).requires_grad_()
            for s in SHAPES]


def set_grads(params: list[torch.Tensor], t: int) -> None:
    gen = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(device=p.device, dtype=p.dtype)


def run(opt, params, steps: int) -> list[torch.Tensor]:
    for t in range(steps):
        set_grads(params, t)
        opt.step()
    return [p.detach().cpu() for p in params]


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check_adamw(device: str) -> list[dict]:
    from lora_cl import RoutedAdamW

    rows = []
    for impl, torch_kw in (("fused", {"fused": True}), ("reference", {"foreach": False})):
        ref = run(torch.optim.AdamW(ps := make_params(device), **HYPER, **torch_kw), ps, 30)
        for routing in ("vanilla", "shared", "decoupled", "v_only"):
            ours = run(RoutedAdamW(ps := make_params(device), routing=routing, impl=impl, **HYPER), ps, 30)
            rows.append({"impl": impl, "routing": routing, "torch": json.dumps(torch_kw),
                         "max_abs_diff": max_abs(ours, ref)})
    return rows


def check_8bit(device: str) -> dict | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    from lora_cl import RoutedAdamW

    p0 = [p.detach().cpu() for p in make_params(device)]
    ours = run(RoutedAdamW(ps := make_params(device), state_bits=8, **HYPER), ps, 100)
    theirs = run(bnb.optim.AdamW8bit(ps := make_params(device), **HYPER), ps, 100)
    rel = max(float((a - b).norm() / (b - s).norm()) for a, b, s in zip(ours, theirs, p0, strict=True))
    return {"steps": 100, "max_abs_diff": max_abs(ours, theirs), "max_rel_norm_diff": rel}


def projection_run(device: str) -> list[torch.Tensor]:
    from lora_cl import FixedStrength, Projection, RoutedAdamW, SubspaceBank

    params = make_params(device)
    names = [f"t{i}" for i in range(len(params))]
    bank = SubspaceBank()
    gen = torch.Generator().manual_seed(7)
    for name, p in zip(names, params, strict=True):
        if p.shape[1] > 8:
            bank.add("old", name, torch.linalg.qr(torch.randn(p.shape[1], 8, generator=gen))[0])
    proj = Projection(bank, strength=FixedStrength(0.5))
    opt = RoutedAdamW([{"params": params, "param_names": names, "routing": "decoupled"}],
                      modifiers=[proj], **HYPER)
    return run(opt, params, 30)


def check_projection(device: str) -> dict:
    here, cpu = projection_run(device), projection_run("cpu")
    rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(here, cpu, strict=True))
    return {"steps": 30, "max_rel_diff_vs_cpu": rel}


ROW_BUFFER_STEPS = 40


def row_buffer_run(device: str, steps: int = ROW_BUFFER_STEPS) -> tuple[dict[str, torch.Tensor], int]:
    """The ogp preset's gradient-row buffer (rows kept on the CPU) fed ``steps`` steps of 16-row
    gradients on ``device``, its cap small enough that the quota halves a few times: its rows,
    and how many synchronizing CUDA calls torch saw while it was fed (sync debug mode "warn")."""
    import warnings

    from lora_cl import GradientRowBuffer

    buf = GradientRowBuffer("in", max_rows=64, window_steps=32, rank=4)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(16, 96, generator=gen) for _ in range(3)] for _ in range(steps)]
    cuda = device == "cuda"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in grads:
                for i, g in enumerate(step):
                    buf.push(f"t{i}", g.to(device))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message).lower() for w in seen)
    return {f"t{i}": buf.rows(f"t{i}") for i in range(3)}, syncs


def check_row_buffer(device: str) -> dict:
    (here, syncs), (cpu, _) = row_buffer_run(device), row_buffer_run("cpu")
    same = all(torch.equal(here[k], cpu[k]) for k in cpu)
    return {"steps": ROW_BUFFER_STEPS, "bitwise_equal_to_cpu": same, "sync_warnings": syncs}


def to_markdown(result: dict, args: argparse.Namespace) -> str:
    lines = [f"# Optimizer parity on `{result['device_name']}` (generated by `python benchmarks/gpu_parity.py"
             f" --out {args.out}{' --device ' + args.device if args.device != 'cuda' else ''}`)", "",
             f"torch {result['torch']}. Parameters after 30 steps (100 for 8-bit) on fixed random "
             "gradients; 0 means bitwise equal.", "",
             "| lora-cl | torch.optim.AdamW | routing | max abs diff |", "|---|---|---|---:|"]
    for r in result["adamw"]:
        lines.append(f"| impl={r['impl']} | {r['torch']} | {r['routing']} | {r['max_abs_diff']:.3g} |")
    q8 = result["8bit"]
    lines += ["", "8-bit states vs bitsandbytes AdamW8bit: " + (
        "bitsandbytes not installed" if q8 is None else
        f"max abs diff {q8['max_abs_diff']:.3g}, difference / distance travelled "
        f"{q8['max_rel_norm_diff']:.3g} (worst tensor) after {q8['steps']} steps."),
        "", f"Decoupled projection on the device vs the CPU: max relative difference "
        f"{result['projection']['max_rel_diff_vs_cpu']:.3g} after {result['projection']['steps']} steps.",
        "", f"The ogp preset's gradient-row buffer fed gradients on the device (rows kept on the CPU, "
        f"{result['row_buffer']['steps']} steps, the quota halving on the way): rows "
        f"{'bitwise equal to' if result['row_buffer']['bitwise_equal_to_cpu'] else 'DIFFERENT from'} the "
        f"CPU-fed buffer's; synchronizing CUDA calls seen (torch's sync debug mode): "
        f"{result['row_buffer']['sync_warnings']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/gpu_parity.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_parity.py: no CUDA device here; nothing measured")
        return 0
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"device": args.device, "device_name": name, "torch": torch.__version__,
              "adamw": check_adamw(args.device), "8bit": check_8bit(args.device),
              "projection": check_projection(args.device), "row_buffer": check_row_buffer(args.device)}
    text = to_markdown(result, args)
    print(text, flush=True)
    from lora_cl.paths import atomic_write_text

    atomic_write_text(args.out, text)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
