"""The reproduction report's figures (PNG), drawn from collected values only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_cl.reproduce.stats import MeanCI


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(stats: dict[str, dict[str, MeanCI]], path: Path, title: str) -> None:
    """One panel per column: mean per method with its 95% CI as error bars."""
    plt = _plt()
    cols = list(stats)
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        labels = list(stats[col])
        means = [stats[col][m].mean or 0.0 for m in labels]
        errs = [stats[col][m].half_width or 0.0 for m in labels]
        ax.bar(range(len(labels)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(col, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prop1(synthetic: dict[str, Any] | None, real: Sequence[dict[str, Any]], path: Path) -> None:
    """R_eta vs alpha: synthetic (aligned, rotated), real training (per seed) and 1/(1-alpha)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas: list[float] = []
    if synthetic is not None:
        for kind, pts in synthetic["results"].items():
            alphas = [p["alpha"] for p in pts]
            ax.plot(alphas, [p["lr_ratio"] for p in pts], "o-", label=f"synthetic, {kind} basis")
    for doc in real:
        pts = [p for p in doc["points"] if "all" in p["groups"]]
        alphas = alphas or [p["alpha"] for p in pts]
        ax.plot([p["alpha"] for p in pts], [p["groups"]["all"]["lr_ratio"] for p in pts], "s-",
                label=f"real LoRA training, seed {doc['seed']}")
        ax.plot([p["alpha"] for p in pts], [p["groups"]["all"]["update_ratio"] or float("nan")
                                            for p in pts], "^:", label=f"R_dW real, seed {doc['seed']}")
    if alphas:
        ax.plot(alphas, [1 / (1 - a) for a in alphas], "k--", label="predicted 1/(1-alpha)")
    ax.set_xlabel("projection strength alpha")
    ax.set_ylabel("eta_U(shared) / eta_U(decoupled)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlap_hist(samples: dict[str, list[float]], path: Path) -> None:
    """Histogram of the logged overlap s_t per stream."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for stream, xs in samples.items():
        if xs:
            ax.hist(xs, bins=30, range=(0, 1), alpha=0.5, density=True, label=f"{stream} (n={len(xs)})")
    ax.set_xlabel("overlap s_t = ||G U||^2 / ||G||^2")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def r_matrices(mats: dict[str, list[list[float]]], domains: Sequence[str], path: Path, title: str,
               unit_range: bool = True) -> None:
    """One heatmap per method: R[i][j] = score on task j (column) after training task i (row);
    a [0, 1] colour scale for rates, one shared scale over the methods otherwise."""
    plt = _plt()
    names = list(mats)
    values = [x for R in mats.values() for row in R for x in row]
    vmin, vmax = (0.0, 1.0) if unit_range else (min(values), max(values))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        im = ax.imshow(mats[name], vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(domains)), domains, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(mats[name])), [f"after {d}" for d in domains[: len(mats[name])]],
                      fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def eta_scatter(rows: Sequence[tuple[str, int, float, float]], path: Path, title: str) -> None:
    """Forgetting (y) against R_eta (x), one colour per method, one point per seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r[0] for r in rows):
        pts = [(x, y) for m, _, x, y in rows if m == method]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", label=method, alpha=0.85)
    xs = [r[2] for r in rows]
    if xs and max(xs) / min(xs) > 4:  # a log axis only where the ratios span a wide range
        ax.set_xscale("log")
    ax.set_xlabel("R_eta: old-direction effective LR / ogp-fixed's (same seed)")
    ax.set_ylabel("forgetting (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def by_steps(panels: dict[str, dict[int, dict[str, MeanCI]]], path: Path, title: str) -> None:
    """One panel per metric: per method, its mean (95% CI as error bars) at each number of steps per
    domain, joined by a line, so a reader sees how each method's value moves with training length."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, by_len) in zip(axes[0], panels.items(), strict=True):
        steps = sorted(by_len)
        methods = list(dict.fromkeys(m for n in steps for m in by_len[n]))
        for k, method in enumerate(methods):
            pts = [(n, by_len[n][method]) for n in steps if by_len[n].get(method) is not None
                   and by_len[n][method].mean is not None]
            shift = (k - (len(methods) - 1) / 2) * 0.015 * (steps[-1] - steps[0] or 1)  # no overlapping bars
            ax.errorbar([n + shift for n, _ in pts], [s.mean for _, s in pts],
                        yerr=[s.half_width or 0.0 for _, s in pts], marker="o", capsize=3, label=method)
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_xlabel("training steps per domain")
        ax.set_title(metric, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
