"""The report's PNG plots: R heatmap, per-domain curves, training traces, method comparisons."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_cl.paths import atomic_write_bytes
from lora_cl.run_results import (
    HIGHER_METRICS,
    SHOW,
    UNIT,
    RunResult,
    common_primary,
    direction_label,
    domain_union,
    extra_metrics,
    fmt,
    forgetting_by_domain,
    what_label,
)


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8, 6),
            sharex: bool = False) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, sharex=sharex)


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # no pyplot, no global backend: safe inside a server or a test
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _axis_label(metric: str) -> str:
    return f"{SHOW.get(metric, metric)}" + (f" ({UNIT[metric]})" if metric in UNIT else "")


def plot_matrix(run: RunResult, path: str | os.PathLike[str]) -> None:
    """Heatmap of R on the primary metric; unfinished rows blank, values written when T <= 16."""
    T, p = run.T, run.primary
    A = np.full((T, T), np.nan)
    A[: run.finished] = run.R()
    fig, axes = _figure(size=(max(6.0, 0.7 * T + 3), max(5.0, 0.6 * T + 2.5)))
    ax = axes[0, 0]
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis" if run.higher_is_better() else "viridis_r"].with_extremes(bad="white")
    masked = np.ma.masked_invalid(A)
    im = ax.imshow(masked, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label=f"{_axis_label(p)}, {direction_label(run.higher_is_better())}")
    ax.set_xticks(range(T), run.domains, rotation=45, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in run.domains])
    ax.set_xlabel("evaluated domain")
    ax.set_ylabel("training stage")
    done = "" if run.complete else f" ({run.finished}/{T} domains)"
    ax.set_title(f"{run.label}: {SHOW.get(p, p)} after each training stage{done}")
    if T <= 16 and masked.count():
        norm = im.norm
        for t in range(run.finished):
            for i in range(T):
                if math.isfinite(A[t, i]):
                    r, g, b = cmap(norm(A[t, i]))[:3]
                    color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(i, t, fmt(p, A[t, i]), ha="center", va="center", fontsize=8, color=color)
    _save(fig, Path(path))


def plot_curves(run: RunResult, path: str | os.PathLike[str]) -> None:
    """Score on each domain vs training stage (stage 0: base model), a star where it was trained."""
    p, R, b = run.primary, run.R(), run.base()
    rows = ([b] if b is not None else []) + list(R)
    x0 = 0 if b is not None else 1
    fig, axes = _figure(size=(9, 5.5))
    ax = axes[0, 0]
    for i, name in enumerate(run.domains):
        xs = np.arange(x0, x0 + len(rows))
        (line,) = ax.plot(xs, [r[i] for r in rows], marker="o", ms=3, label=name)
        if i < run.finished:
            ax.plot(i + 1, R[i, i], marker="*", ms=12, color=line.get_color())
    ax.set_xticks(range(run.T + 1), ["base", *run.domains], rotation=45, ha="right")
    ax.set_xlim(-0.3, run.T + 0.3)
    ax.set_xlabel("training stage (after training domain)")
    ax.set_ylabel(f"{_axis_label(p)}, {direction_label(run.higher_is_better())}")
    ax.set_title(f"{run.label}: {SHOW.get(p, p)} on each domain over the stream (★ = just trained)")
    ax.grid(alpha=0.3)
    ax.legend(title="evaluated domain", fontsize=8, loc="best", ncol=1 + run.T // 12)
    _save(fig, Path(path))


def _training_logs(run: RunResult) -> list[tuple[str, float, float, list[dict[str, Any]]]]:
    """(domain, start, end, log entries with a global 'x' step) per finished domain.

    The Trainer may count steps per domain or across the stream; steps that do not continue
    past the previous domain's end are taken as per-domain and shifted.
    """
    out, end = [], 0.0
    for d in run.domain_metrics:
        logs = [h for h in d.get("log_history") or [] if isinstance(h, dict) and "step" in h]
        steps = [float(h["step"]) for h in logs]
        shift = end if steps and min(steps) <= end else 0.0
        start = end
        end = max([end + float(d.get("steps") or 0), *(s + shift for s in steps)])
        out.append((str(d.get("domain", "?")), start, end, [{**h, "x": float(h["step"]) + shift}
                                                             for h in logs]))
    return out


def plot_training(run: RunResult, path: str | os.PathLike[str]) -> None:
    """Training loss vs global step with domain boundaries; projection alpha/overlap if logged."""
    segs = _training_logs(run)
    proj = [k for k in ("projection/alpha", "projection/overlap")
            if any(k in h for s in segs for h in s[3])]
    fig, axes = _figure(2 if proj else 1, 1, size=(10, 7 if proj else 4.5), sharex=True)
    ax = axes[0, 0]
    xs = [h["x"] for s in segs for h in s[3] if "loss" in h]
    ax.plot(xs, [h["loss"] for s in segs for h in s[3] if "loss" in h], lw=1.2, color="C0")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{run.label}: training loss over the stream")
    if not xs:
        ax.text(0.5, 0.5, "no training loss logged yet", ha="center", transform=ax.transAxes)
    if proj:
        pax = axes[1, 0]
        for k in proj:
            pts = [(h["x"], h[k]) for s in segs for h in s[3] if k in h]
            pax.plot([x for x, _ in pts], [y for _, y in pts], lw=1.2, label=k.split("/")[1])
        pax.set_ylabel("projection (0-1)")
        pax.set_title("projection strength alpha and overlap with old-domain bases")
        pax.legend(fontsize=8)
    for row in axes[:, 0]:
        for name, start, end, _ in segs:
            row.axvline(end, color="grey", ls="--", lw=0.8)
            if row is ax:
                row.text((start + end) / 2, 0.97, name, transform=row.get_xaxis_transform(),
                         ha="center", va="top", fontsize=8,
                         bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        row.grid(alpha=0.3)
    ax.margins(y=0.12)
    axes[-1, 0].set_xlabel("global optimizer step")
    _save(fig, Path(path))


def _bars(ax: Any, labels: list[str], values: list[float | None], metric: str, signed: bool) -> None:
    v = [np.nan if x is None else x for x in values]
    bars = ax.bar(range(len(labels)), v, color=[f"C{i % 10}" for i in range(len(labels))])
    for rect, x in zip(bars, values, strict=True):
        mid = rect.get_x() + rect.get_width() / 2
        if x is None or not math.isfinite(x):  # unfinished run: say so mid-panel
            ax.text(mid, 0.5, "n/a", ha="center", transform=ax.get_xaxis_transform(), fontsize=8)
        else:
            ax.annotate(fmt(metric, x, signed=signed), (mid, x), ha="center",
                        va="top" if x < 0 else "bottom", fontsize=8)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.6)


def plot_comparison(runs: Sequence[RunResult], path: str | os.PathLike[str]) -> None:
    """One panel per summary metric (OP, forgetting, BWT, final means), one bar per method."""
    p = common_primary(runs)
    labels = [r.label for r in runs]
    panels = [("op", p, f"OP ({what_label(p, direction_label(runs[0].higher_is_better(p)))})", False),
              ("forgetting", p, f"forgetting ({what_label(p, 'lower better')})", True),
              ("bwt_trace", p, f"BWT TRACE ({what_label(p, 'higher better')})", True)]
    panels += [("op", m, f"final mean {what_label(m, direction_label(m in HIGHER_METRICS))}", False)
               for m in extra_metrics(runs, p)]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols, size=(4.2 * cols, 3.8 * rows))
    for k, (key, m, title, signed) in enumerate(panels):
        ax = axes[k // cols, k % cols]
        vals = [(r.summary(m) or {}).get(key) if m in r.metrics else None for r in runs]
        _bars(ax, labels, vals, m, signed)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(_axis_label(m))
    for k in range(len(panels), rows * cols):
        axes[k // cols, k % cols].set_visible(False)
    fig.suptitle("methods compared (n/a: run not finished)")
    _save(fig, Path(path))


def plot_forgetting(runs: Sequence[RunResult], path: str | os.PathLike[str]) -> None:
    """Grouped bars: Chaudhry forgetting of each domain (all but the last), one bar per method."""
    p = common_primary(runs)
    names = domain_union(runs)[:-1] or domain_union(runs)
    fig, axes = _figure(size=(max(7.0, 0.5 * len(names) * len(runs) + 3), 5))
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    for k, r in enumerate(runs):
        f = forgetting_by_domain(r, p)
        xs = np.arange(len(names)) + (k - (len(runs) - 1) / 2) * width
        label = r.label if r.summary(p) else f"{r.label} (not finished)"
        ax.bar(xs, [f.get(n, np.nan) for n in names], width, label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_xlabel("domain")
    ax.set_ylabel(f"forgetting ({what_label(p, 'lower better')})")
    ax.set_title("forgetting per domain: best score since trained minus final score")
    ax.legend(title="method", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, Path(path))
