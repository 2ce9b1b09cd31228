"""Accuracy of the fused path's first-moment pre-correction against the reference path, by beta1.

    python benchmarks/fused_beta1_accuracy.py

The fused path feeds torch's fused AdamW kernel g_v and pre-corrects m by (1-b1)/b1 * (g_m - g_v);
the scale grows as beta1 -> 0. Prints the max relative error of m after 20 routed steps for each
beta1, calling the kernel directly (below ``FUSED_MIN_BETA1`` RoutedAdamW takes the reference path).
"""

from __future__ import annotations

import torch

from lora_cl.optim.functional import FUSED_MIN_BETA1, _fused_kernel, routed_adamw_reference


def max_rel_error(beta1: float, trials: int = 3) -> float:
    worst = 0.0
    for trial in range(trials):
        gen = torch.Generator().manual_seed(trial)
        p = torch.randn(64, 256, generator=gen)
        g_m = [torch.randn(64, 256, generator=gen) * 1e-3 for _ in range(20)]
        g_v = [g + torch.randn(64, 256, generator=gen) * 1e-5 for g in g_m]
        moments = []
        for fused in (True, False):
            q, m, v, step = p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
            for a, b in zip(g_m, g_v, strict=True):
                hyper = dict(lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.0)
                if fused:  # the pre-correction and the kernel, as routed_adamw_fused runs them
                    m.add_(a, alpha=(1 - beta1) / beta1).add_(b, alpha=-(1 - beta1) / beta1)
                    _fused_kernel([q], [b], [m], [v], [step], **hyper)
                else:
                    routed_adamw_reference([q], [a], [b], [m], [v], [step], **hyper)
            moments.append(m)
        worst = max(worst, float((moments[0] - moments[1]).abs().max() / moments[1].abs().max()))
    return worst


def main() -> None:
    print(f"FUSED_MIN_BETA1 = {FUSED_MIN_BETA1}")
    print("beta1      max relative error of m (fused pre-correction vs reference)")
    for beta1 in (0.9, 0.5, 0.1, 1e-2, 1e-3, 1e-4, 1e-6):
        print(f"{beta1:<10g} {max_rel_error(beta1):.2e}")


if __name__ == "__main__":
    main()
