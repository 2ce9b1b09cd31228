"""The ``lora-cl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_diagnose_prop1(args: argparse.Namespace) -> int:
    from lora_cl.diagnostics.prop1 import plot_prop1, points_to_dicts, run_prop1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["aligned", "rotated"] if args.basis == "both" else [args.basis]
    results = {}
    for kind in kinds:
        print(f"Proposition 1, {kind} basis: {args.steps} steps x 2 routings x 8 alphas", flush=True)
        results[kind] = run_prop1(steps=args.steps, basis=kind, seed=args.seed,
                                  overlap=args.overlap, progress=True)
    gate = "aligned" if "aligned" in results else kinds[0]
    print()
    print("| basis | alpha | R_eta measured | 1/(1-alpha) | rel. err | R_v measured | 1/(1-alpha)^2 | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, points in results.items():
        for p in points:
            print(f"| {kind} | {p.alpha:.1f} | {p.lr_ratio:.3f} | {p.lr_ratio_predicted:.3f} | "
                  f"{100 * p.lr_rel_error:.1f}% | {p.v_ratio:.3f} | {p.v_ratio_predicted:.3f} | "
                  f"{100 * p.v_rel_error:.1f}% |")
    worst = max(p.lr_rel_error for p in results[gate])
    payload = {
        "steps": args.steps, "seed": args.seed, "overlap": args.overlap,
        "tolerance": args.tolerance, "gated_on": gate, "max_lr_rel_error": worst,
        "results": {k: points_to_dicts(v) for k, v in results.items()},
    }
    tmp = out / "prop1.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out / "prop1.json")
    plot_prop1(results, str(out / "prop1.png"))
    print(f"\nwrote {out / 'prop1.json'} and {out / 'prop1.png'}")
    ok = worst <= args.tolerance
    verdict = "within" if ok else "NOT within"
    print(f"Proposition 1 ({gate} basis): max relative error of R_eta = {100 * worst:.2f}% "
          f"({verdict} the {100 * args.tolerance:.0f}% tolerance)")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-cl",
        description="Continual LoRA finetuning with decoupled moment routing.",
    )
    from lora_cl import __version__

    parser.add_argument("--version", action="version", version=f"lora-cl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    diag = sub.add_parser("diagnose", help="diagnostics of the attenuate-then-adapt conflict")
    diag_sub = diag.add_subparsers(dest="diagnostic", required=True)
    p1 = diag_sub.add_parser(
        "prop1",
        help="measure Proposition 1 (old-direction effective-LR inflation 1/(1-alpha)) "
             "on a synthetic stream; exits 1 if any point is off by more than --tolerance",
    )
    p1.add_argument("--out", default="runs/prop1", help="output directory (default: runs/prop1)")
    p1.add_argument("--steps", type=int, default=3000, help="optimizer steps per run")
    p1.add_argument("--basis", choices=["aligned", "rotated", "both"], default="both",
                    help="old-subspace basis: coordinate axes (the proposition's setting, gated), "
                         "a random rotation (reported), or both (default)")
    p1.add_argument("--overlap", type=float, default=0.5,
                    help="share of gradient-noise energy inside the old subspace")
    p1.add_argument("--tolerance", type=float, default=0.08)
    p1.add_argument("--seed", type=int, default=0)
    p1.set_defaults(func=_cmd_diagnose_prop1)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
