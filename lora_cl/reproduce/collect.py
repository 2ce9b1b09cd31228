"""Read finished cells back: per-seed metric values, compute used and logged overlaps.

Everything the reproduction report shows comes from here, i.e. from the run directories'
``summary.json``, ``domains/*/metrics.json`` (train/eval/basis seconds, ``log_history``) and
part 1's JSON results; nothing is typed in.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cl.reproduce.grid import Cell
from lora_cl.reproduce.stats import MeanCI, mean_ci


@dataclass
class CellResult:
    """A finished cell, read."""

    cell: Cell
    summary: dict[str, Any]
    seconds: float
    overlaps: list[list[float]] = field(default_factory=list)  # per domain: logged overlap s_t
    platform: str = "unknown"  # where it ran, from run.json (device, else the torch build)
    matrices: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> R (matrix.json)
    eta_old: list[float] = field(default_factory=list)  # logged probe/old_direction_lr (domains 2..T)
    replay: tuple[float, int] | None = None  # last training log's (cl/replay_loss, cl/replay_examples)
    base_loss: list[float] = field(default_factory=list)  # the base model's held-out loss per domain
    epochs: list[tuple[str, float]] = field(default_factory=list)  # per domain: (name, epoch at its end)


#: The callback's probe of Adam's effective learning rate along the old subspaces (mean over tensors)
ETA_KEY = "probe/old_direction_lr"
#: The callback's loss on the replay batch (the buffer of earlier domains' examples) at each log
REPLAY_LOSS_KEY = "cl/replay_loss"


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_cell(cell: Cell, cache: Path) -> CellResult | None:
    """The cell's results when it is complete, else None."""
    if not cell.complete(cache):
        return None
    run_dir = cell.run_dir(cache)
    seconds, overlaps, eta_old, replay, epochs = 0.0, [], [], None, []
    for mpath in sorted((run_dir / "domains").glob("*/metrics.json")):
        m = _read(mpath)
        seconds += sum(float(m.get(k) or 0.0) for k in ("train_seconds", "eval_seconds", "basis_seconds"))
        history = m.get("log_history", [])
        epoch = next((float(h["epoch"]) for h in reversed(history) if "epoch" in h), None)
        if epoch is not None:
            epochs.append((str(m.get("domain") or mpath.parent.name), epoch))
        overlaps.append([float(h["projection/overlap"]) for h in history if "projection/overlap" in h])
        eta_old += [float(h[ETA_KEY]) for h in history if ETA_KEY in h]
        # the last training log (the end-of-domain summary already counts this domain's examples)
        replay = next(((float(h[REPLAY_LOSS_KEY]), int(h.get("cl/replay_examples", 0)))
                       for h in reversed(history) if REPLAY_LOSS_KEY in h and "loss" in h), replay)
    try:
        metrics = _read(run_dir / "matrix.json")["metrics"]
        matrices = {k: v["R"] for k, v in metrics.items() if "R" in v}
        base_loss = [float(x) for x in (metrics.get("loss") or {}).get("base") or []]
    except (OSError, ValueError, KeyError, TypeError):
        matrices, base_loss = {}, []
    return CellResult(cell, _read(run_dir / "summary.json"), seconds, overlaps, platform_of(run_dir),
                      matrices, eta_old, replay, base_loss, epochs)


def platform_of(run_dir: Path) -> str:
    """run.json's ``device`` with the torch build; older runs recorded only the torch build."""
    try:
        run = _read(run_dir / "run.json")
    except (OSError, ValueError):
        return "unknown"
    torch_version = (run.get("versions") or {}).get("torch", "?")
    return f"{run['device']}, torch {torch_version}" if run.get("device") else f"torch {torch_version}"


def load_cells(cells: Sequence[Cell], cache: Path) -> list[CellResult]:
    """The finished ones of ``cells`` (each distinct run directory once)."""
    out, seen = [], set()
    for c in cells:
        d = c.run_dir(cache)
        if d in seen:
            continue
        seen.add(d)
        r = load_cell(c, cache)
        if r is not None:
            out.append(r)
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def summary_value(summary: dict[str, Any], metric: str, key: str) -> float | None:
    """``summary["metrics"][metric][key]`` (None when missing)."""
    s = (summary.get("metrics") or {}).get(metric)
    value = None if s is None else s.get(key)
    return None if value is None else float(value)


def plasticity_value(summary: dict[str, Any], key: str) -> float | None:
    """Mean over the stream's domains of a plasticity entry (adapt@5 logs, final train loss)."""
    return _mean((summary.get("plasticity") or {}).get(key) or [])


#: Columns of a method table: (header, extractor from summary.json)
Extractor = Callable[[dict[str, Any]], float | None]
LM_COLUMNS: list[tuple[str, Extractor]] = [
    ("forgetting (nats)", lambda s: summary_value(s, "loss", "forgetting")),
    ("forgetting (PPL points)", lambda s: summary_value(s, "ppl", "forgetting")),
    ("avg final PPL", lambda s: summary_value(s, "ppl", "op")),
    ("BWT (nats, TRACE; < 0: worse)", lambda s: summary_value(s, "loss", "bwt_trace")),
    ("adapt@5 logs (train loss)", lambda s: plasticity_value(s, "adapt_at_5_logs")),
    ("final train loss", lambda s: plasticity_value(s, "final_train_loss")),
]
QA_COLUMNS: list[tuple[str, Extractor]] = [
    ("forgetting (EM)", lambda s: summary_value(s, "exact_match", "forgetting")),
    ("OP (EM)", lambda s: summary_value(s, "exact_match", "op")),
    ("BWT (EM, TRACE)", lambda s: summary_value(s, "exact_match", "bwt_trace")),
    ("BWT (EM, GEM)", lambda s: summary_value(s, "exact_match", "bwt_gem")),
    ("forgetting (nats)", lambda s: summary_value(s, "loss", "forgetting")),
    ("adapt@5 logs (train loss)", lambda s: plasticity_value(s, "adapt_at_5_logs")),
]


def by_method(results: Sequence[CellResult], stream: str, extract: Extractor) -> dict[str, dict[int, float]]:
    """label -> seed -> value on ``stream`` (cells without a value are left out)."""
    out: dict[str, dict[int, float]] = {}
    for r in results:
        if r.cell.stream != stream:
            continue
        v = extract(r.summary)
        if v is not None and math.isfinite(v):
            out.setdefault(r.cell.method.label, {})[r.cell.seed] = v
    return out


def method_stats(results: Sequence[CellResult], stream: str, extract: Extractor) -> dict[str, MeanCI]:
    return {m: mean_ci([v[s] for s in sorted(v)]) for m, v in by_method(results, stream, extract).items()}


def forgetting_nats(summary: dict[str, Any]) -> float | None:
    return summary_value(summary, "loss", "forgetting")


def mean_matrix(results: Sequence[CellResult], stream: str, method: str,
                metric: str) -> tuple[list[list[float]], int] | None:
    """Element-wise mean over seeds of ``method``'s R matrix of ``metric`` on ``stream``: R[i][j]
    is the score on domain j after training domain i. None when no finished cell has it."""
    mats = [r.matrices[metric] for r in results
            if r.cell.stream == stream and r.cell.method.label == method and metric in r.matrices]
    if not mats:
        return None
    rows, cols = len(mats[0]), len(mats[0][0])
    mean = [[sum(float(m[i][j]) for m in mats) / len(mats) for j in range(cols)] for i in range(rows)]
    return mean, len(mats)


def eta_vs_forgetting(results: Sequence[CellResult], stream: str, methods: Sequence[str],
                      reference: str = "ogp-fixed") -> list[tuple[str, int, float, float]]:
    """(method, seed, R_eta, forgetting in nats) per finished cell with probes: R_eta is the cell's
    mean logged old-direction effective LR over the same seed's ``reference`` cell's."""
    eta = {(r.cell.method.label, r.cell.seed): sum(r.eta_old) / len(r.eta_old)
           for r in results if r.cell.stream == stream and r.eta_old}
    forget = by_method(results, stream, forgetting_nats)
    rows = []
    for (m, seed), value in sorted(eta.items()):
        ref = eta.get((reference, seed))
        if m in methods and ref and seed in forget.get(m, {}):
            rows.append((m, seed, value / ref, forget[m][seed]))
    return rows


def data_passes(results: Sequence[CellResult], stream: str) -> list[tuple[str, float]]:
    """Per domain of ``stream``: how many passes over its training slice one cell makes (the
    Trainer's epoch at the domain's last step), the median over the finished cells. Seeds and
    methods share steps, batch and slices, so the cells agree (empty when none logged an epoch)."""
    per: dict[int, tuple[str, list[float]]] = {}
    for r in results:
        if r.cell.stream == stream:
            for i, (name, epoch) in enumerate(r.epochs):
                per.setdefault(i, (name, []))[1].append(epoch)
    return [(name, statistics.median(vals)) for _, (name, vals) in sorted(per.items())]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r (None for fewer than 3 points or no spread)."""
    if len(xs) < 3:
        return None
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # a constant input
        return None


@dataclass
class ReplayEvidence:
    """Per method on a stream: the replay buffer's loss at the end against the held-out loss of the
    same earlier domains (a buffer far below held-out has been memorised)."""

    cells: int
    examples: list[int]  # buffer size at the end, per cell
    buffer_loss: MeanCI | None  # last logged loss on the replay batch
    held_out: MeanCI  # final held-out loss, mean over domains 1..T-1
    base: float  # the base model's held-out loss on the same domains (the same on every seed)


def replay_evidence(results: Sequence[CellResult], stream: str,
                    methods: Sequence[str]) -> dict[str, ReplayEvidence]:
    """Replay methods' buffer vs held-out loss on ``stream``, with vanilla as the reference row
    (only ``methods``; empty when none of them replays)."""
    rows: dict[str, list[CellResult]] = {}
    for r in results:
        if r.cell.stream != stream or r.cell.method.label not in methods:
            continue
        if r.replay is not None or r.cell.method.label == "vanilla":
            if "loss" in r.matrices and r.matrices["loss"]:
                rows.setdefault(r.cell.method.label, []).append(r)
    if not any(label != "vanilla" for label in rows):
        return {}
    out = {}
    for label, cells in rows.items():
        held, base, buffer, examples = [], [], [], []
        for r in cells:
            last = r.matrices["loss"][-1]
            held.append(sum(last[:-1]) / max(len(last) - 1, 1))
            base += r.base_loss[:-1]
            if r.replay is not None:
                buffer.append(r.replay[0])
                examples.append(r.replay[1])
        out[label] = ReplayEvidence(len(cells), examples, mean_ci(buffer) if buffer else None,
                                    mean_ci(held), sum(base) / len(base) if base else float("nan"))
    return out
