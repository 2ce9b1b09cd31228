"""Proposition 1, measured: shared routing inflates the old-direction effective LR by 1/(1-alpha).

A synthetic new-domain stream: a parameter W (rows x dim) trained by RoutedAdamW on a noisy
quadratic, g_t = (W - W*) + noise_t, with a k-dim old-domain basis U in a SubspaceBank and
``Projection(bank, FixedStrength(alpha), weighted=False)``. The same gradient noise is fed to a
``shared`` and a ``decoupled`` run; over the last quarter of the steps we average the probes
of :mod:`lora_cl.diagnostics.probes` and compare

    R_eta = eta_U(shared) / eta_U(decoupled)     with 1/(1-alpha)
    R_v   = E_U(v, decoupled) / E_U(v, shared)   with 1/(1-alpha)^2.

``basis="aligned"`` takes U = the first k coordinate axes, the setting of the proposition
(Adam's preconditioner is diagonal, so "along u" is a coordinate). ``basis="rotated"``
takes a random orthonormal U: the inflation is then diluted, since each coordinate of v
mixes protected and free directions; reported, not gated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lora_cl.diagnostics.probes import old_direction_lr, v_energy_in_subspace
from lora_cl.modifiers.projection import Projection
from lora_cl.modifiers.strength import FixedStrength
from lora_cl.optim.routed_adamw import RoutedAdamW
from lora_cl.subspace.bank import SubspaceBank

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class Prop1Point:
    alpha: float
    lr_ratio: float
    lr_ratio_predicted: float
    lr_rel_error: float
    v_ratio: float
    v_ratio_predicted: float
    v_rel_error: float


def _basis(dim: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "aligned":
        return torch.eye(dim)[:, :k].contiguous()
    if kind == "rotated":
        q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
        return q
    raise ValueError(f"prop1: basis must be 'aligned' or 'rotated', got {kind!r}")


def _run(routing: str, alpha: float, U: torch.Tensor, noise: list[torch.Tensor], target: torch.Tensor,
         lr: float, measure_from: int) -> tuple[float, float]:
    w = torch.zeros_like(target, requires_grad=True)
    bank = SubspaceBank()
    bank.add("old", "w", U)
    opt = RoutedAdamW([{"params": [w], "param_names": ["w"]}], lr=lr, routing=routing,
                      modifiers=[Projection(bank, FixedStrength(alpha), weighted=False)])
    beta2, eps = opt.defaults["betas"][1], opt.defaults["eps"]
    lrs, energies = [], []
    for t, xi in enumerate(noise):
        w.grad = (w.detach() - target) + xi
        opt.step()
        if t >= measure_from:
            st = opt.state[w]
            step = float(st["step"])
            lrs.append(old_direction_lr(st["exp_avg_sq"], U, step, lr, beta2, eps))
            energies.append(v_energy_in_subspace(st["exp_avg_sq"], U, step, beta2))
    return sum(lrs) / len(lrs), sum(energies) / len(energies)


def run_prop1(alphas: tuple[float, ...] = DEFAULT_ALPHAS, *, steps: int = 3000, rows: int = 8,
              dim: int = 64, k: int = 8, basis: str = "aligned", overlap: float = 0.5,
              noise_scale: float = 1.0, lr: float = 1e-3, seed: int = 0,
              progress: bool = False) -> list[Prop1Point]:
    """Measure R_eta and R_v at each alpha (see the module docstring).

    ``overlap`` is the share of the gradient-noise energy inside span(U).
    """
    if not 0.0 < overlap < 1.0:
        raise ValueError(f"prop1: overlap must be in (0, 1), got {overlap}")
    gen = torch.Generator().manual_seed(seed)
    U = _basis(dim, k, basis, gen)
    P = U @ U.T
    inside = (overlap * dim / k) ** 0.5
    outside = ((1 - overlap) * dim / (dim - k)) ** 0.5
    noise = []
    for _ in range(steps):
        z = torch.randn(rows, dim, generator=gen) * noise_scale
        noise.append(inside * z @ P + outside * (z - z @ P))
    target = 0.1 * torch.randn(rows, dim, generator=gen)
    points = []
    for alpha in alphas:
        lr_s, e_s = _run("shared", alpha, U, noise, target, lr, steps * 3 // 4)
        lr_d, e_d = _run("decoupled", alpha, U, noise, target, lr, steps * 3 // 4)
        pred_lr, pred_v = 1 / (1 - alpha), 1 / (1 - alpha) ** 2
        point = Prop1Point(alpha=alpha, lr_ratio=lr_s / lr_d, lr_ratio_predicted=pred_lr,
                           lr_rel_error=abs(lr_s / lr_d - pred_lr) / pred_lr,
                           v_ratio=e_d / e_s, v_ratio_predicted=pred_v,
                           v_rel_error=abs(e_d / e_s - pred_v) / pred_v)
        points.append(point)
        if progress:
            print(f"  alpha={alpha:.1f}  R_eta={point.lr_ratio:.3f} (pred {pred_lr:.3f})  "
                  f"R_v={point.v_ratio:.3f} (pred {pred_v:.3f})", flush=True)
    return points


def points_to_dicts(points: list[Prop1Point]) -> list[dict[str, float]]:
    return [asdict(p) for p in points]


def plot_prop1(results: dict[str, list[Prop1Point]], path: str) -> None:
    """One panel per quantity: measured ratios per basis kind beside the predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    any_points = next(iter(results.values()))
    alphas = [p.alpha for p in any_points]
    specs = [("lr_ratio", "lr_ratio_predicted", "R_eta = eta_U(shared) / eta_U(decoupled)",
              "1/(1-alpha)"),
             ("v_ratio", "v_ratio_predicted", "R_v = E_U(v, decoupled) / E_U(v, shared)",
              "1/(1-alpha)^2")]
    for ax, (key, pred_key, title, pred_label) in zip(axes, specs, strict=True):
        for kind, points in results.items():
            ax.plot(alphas, [getattr(p, key) for p in points], "o-", markersize=8, alpha=0.8,
                    label=f"measured, {kind} basis")
        ax.plot(alphas, [getattr(p, pred_key) for p in any_points], "k--", linewidth=1.5, zorder=5,
                label=f"predicted {pred_label}")
        ax.set_yscale("log")
        ax.set_xlabel("projection strength alpha")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Proposition 1: shared routing re-inflates the attenuated directions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
