"""Run directories read back: :class:`RunResult` (score matrices, summaries, metadata, timings) and
the labels every report shares. Reads only; :mod:`lora_cl.report` and :mod:`lora_cl.report_plots`
write the tables and figures."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_cl import metrics as M

METRICS = ("loss", "ppl", "exact_match", "rougeL")
HIGHER_METRICS = ("exact_match", "rougeL")  # higher is better; loss and PPL: lower
SHOW = {"loss": "loss", "ppl": "PPL", "exact_match": "EM", "rougeL": "ROUGE-L"}
UNIT = {"loss": "nats"}
DECIMALS = {"ppl": 2}  # everything else: 4 decimals
DASH = "–"


class ReportError(ValueError):
    """A directory that is not a readable lora-cl run (or comparison), said for a person."""


@dataclass
class RunResult:
    """One run directory, read: its metadata, score matrices and per-domain metrics."""

    label: str
    dir: Path
    meta: dict[str, Any]
    domains: list[str]
    primary: str
    metrics: dict[str, dict[str, Any]]
    base_eval: dict[str, Any] | None
    domain_metrics: list[dict[str, Any]]
    complete: bool

    @property
    def T(self) -> int:
        return len(self.domains)

    @property
    def finished(self) -> int:
        """Domains trained so far (rows of R)."""
        return len(self.metrics[self.primary]["R"])

    def R(self, metric: str | None = None) -> np.ndarray:
        """Scores so far, shape (finished, T); row t: every domain after training domain t."""
        rows = self.metrics[metric or self.primary]["R"]
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.T)

    def base(self, metric: str | None = None) -> np.ndarray | None:
        b = self.metrics[metric or self.primary].get("base")
        return None if b is None else np.asarray(b, dtype=np.float64)

    def higher_is_better(self, metric: str | None = None) -> bool:
        return bool(self.metrics[metric or self.primary]["higher_is_better"])

    def summary(self, metric: str | None = None) -> dict[str, Any] | None:
        """:func:`lora_cl.metrics.summarize` of a complete, finite matrix; None otherwise."""
        metric = metric or self.primary
        R, b = self.R(metric), self.base(metric)
        if not self.complete or not np.isfinite(R).all():
            return None
        base = list(b) if b is not None and np.isfinite(b).all() else None
        return M.summarize(R, base, self.higher_is_better(metric), self.domains)

    def train_seconds(self) -> float:
        return float(sum(d.get("train_seconds") or 0.0 for d in self.domain_metrics))


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path}: corrupt {what} ({err.msg} at line {err.lineno}, column {err.colno}); "
            f"restore it or rerun the stream to rebuild it"
        ) from err
    except OSError as err:
        raise ReportError(f"{path}: cannot read {what}: {err.strerror or err}") from err


def load_run(run_dir: str | os.PathLike[str]) -> RunResult:
    """Read a run directory; raise :class:`ReportError` saying what is wrong and how to fix it."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"{d}: no such directory; pass the directory `lora-cl train` wrote")
    if not (d / "run.json").is_file():
        hint = ("; it holds compare.json, so report it as a comparison"
                if (d / "compare.json").is_file() else "")
        raise ReportError(f"{d}: not a lora-cl run directory (no run.json); "
                          f"pass the directory `lora-cl train` wrote{hint}")
    meta = read_json_file(d / "run.json", "run metadata")
    if not isinstance(meta, dict):
        raise ReportError(f"{d / 'run.json'}: expected a JSON object, got {type(meta).__name__}")
    mpath = d / "matrix.json"
    if not mpath.is_file():
        raise ReportError(f"{mpath}: missing; no domain of this run has finished yet "
                          f"(the stream writes it after each domain)")
    doc = read_json_file(mpath, "score matrix")
    domains, primary, metrics = _check_matrix(mpath, doc, meta)
    base_path = d / "base_eval.json"
    base_eval = read_json_file(base_path, "base evaluation") if base_path.is_file() else None
    dm = [read_json_file(p, "domain metrics") for p in sorted(d.glob("domains/*/metrics.json"))]
    dm.sort(key=lambda m: m.get("index", 0) if isinstance(m, dict) else 0)
    run = RunResult(label=str(meta.get("label") or d.name), dir=d, meta=meta, domains=domains,
                    primary=primary, metrics=metrics, base_eval=base_eval,
                    domain_metrics=[m for m in dm if isinstance(m, dict)], complete=False)
    run.complete = run.finished == run.T
    return run


def _check_matrix(path: Path, doc: Any, meta: dict[str, Any]) -> tuple[list[str], str, dict]:
    def bad(why: str) -> ReportError:
        return ReportError(f"{path}: {why}; the stream rebuilds it from domains/ after each domain")

    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise bad("not a lora-cl score matrix (no 'metrics' object)")
    domains = doc.get("domains") or meta.get("domains")
    if not isinstance(domains, list) or not domains:
        raise bad("no 'domains' list")
    T = len(domains)
    metrics = doc["metrics"]
    primary = doc.get("primary") or "loss"
    if primary not in metrics:
        raise bad(f"primary metric {primary!r} has no matrix (has {sorted(metrics)})")
    for name, m in metrics.items():
        R = m.get("R") if isinstance(m, dict) else None
        if not isinstance(R, list) or len(R) > T:
            raise bad(f"metrics.{name}.R must be a list of at most T = {T} rows")
        for t, row in enumerate(R):
            if not isinstance(row, list) or len(row) != T:
                raise bad(f"metrics.{name}.R row {t} must hold {T} scores, one per domain")
            if not all(isinstance(x, int | float) for x in row):
                raise bad(f"metrics.{name}.R row {t} holds a non-number")
        b = m.get("base")
        if b is not None and (not isinstance(b, list) or len(b) != T):
            raise bad(f"metrics.{name}.base must hold {T} scores")
        m.setdefault("higher_is_better", name in ("exact_match", "rougeL"))
    if len({len(m["R"]) for m in metrics.values()}) > 1:
        raise bad("its metrics have different numbers of rows")
    return [str(x) for x in domains], primary, metrics


def as_runs(runs: Sequence[RunResult | str | os.PathLike[str]]) -> list[RunResult]:
    out = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    if not out:
        raise ReportError("no runs to report")
    return out


def fmt(metric: str, x: float | None, *, signed: bool = False) -> str:
    """A score as the reports print it: 4 decimals (2 for PPL), '–' when absent or not finite."""
    if x is None or not math.isfinite(x):
        return DASH
    return f"{x:{'+' if signed else ''}.{DECIMALS.get(metric, 4)}f}"


def what_label(metric: str, better: str) -> str:
    """'loss, nats, lower better' — a column's metric, unit and direction."""
    return ", ".join([SHOW.get(metric, metric), *([UNIT[metric]] if metric in UNIT else []), better])


def direction_label(hib: bool) -> str:
    return "higher better" if hib else "lower better"


def extra_metrics(runs: Sequence[RunResult], primary: str) -> list[str]:
    return [m for m in METRICS if m != primary and any(m in r.metrics for r in runs)]


def common_primary(runs: Sequence[RunResult]) -> str:
    p = runs[0].primary
    lacking = [r.label for r in runs if p not in r.metrics]
    if lacking:
        raise ReportError(f"runs {', '.join(lacking)} have no {p!r} scores, the primary metric of "
                          f"{runs[0].label}; compare runs evaluated on the same metric")
    return p


def forgetting_by_domain(run: RunResult, metric: str) -> dict[str, float]:
    """Chaudhry forgetting of each of the run's first T-1 domains, by name (empty if unfinished)."""
    f = (run.summary(metric) or {}).get("forgetting_per_domain") or []
    return dict(zip(run.domains[: len(f)], f, strict=True))


def domain_union(runs: Sequence[RunResult]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r.domains if n not in names]
    return names
