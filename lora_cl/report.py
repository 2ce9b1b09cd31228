"""Reports on stream runs: a results table, ``report.md`` and plots, read from run directories.

A run directory (``lora-cl train``) holds ``run.json``, ``base_eval.json``, ``matrix.json`` and
``domains/<ii>-<name>/metrics.json``; a comparison directory holds ``compare.json`` and one run
per subdirectory. This module only reads those files and writes ``report.md`` and ``plots/*.png``,
so it works on a run that is still going (unfinished rows are shown as pending).

Signs follow :mod:`lora_cl.metrics`: BWT < 0 and forgetting > 0 mean old domains got worse,
FWT > 0 means earlier domains helped a later one before it was trained; OP is a level in the
primary metric's own units and direction.
"""

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
from lora_cl.paths import atomic_write_text

METRICS = ("loss", "ppl", "exact_match", "rougeL")
_SHOW = {"loss": "loss", "ppl": "PPL", "exact_match": "EM", "rougeL": "ROUGE-L"}
_UNIT = {"loss": "nats"}
_DECIMALS = {"ppl": 2}  # everything else: 4 decimals
_DASH = "–"


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


# ---------------------------------------------------------------- reading


def _read_json(path: Path, what: str) -> Any:
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
    meta = _read_json(d / "run.json", "run metadata")
    if not isinstance(meta, dict):
        raise ReportError(f"{d / 'run.json'}: expected a JSON object, got {type(meta).__name__}")
    mpath = d / "matrix.json"
    if not mpath.is_file():
        raise ReportError(f"{mpath}: missing; no domain of this run has finished yet "
                          f"(the stream writes it after each domain)")
    doc = _read_json(mpath, "score matrix")
    domains, primary, metrics = _check_matrix(mpath, doc, meta)
    base_path = d / "base_eval.json"
    base_eval = _read_json(base_path, "base evaluation") if base_path.is_file() else None
    dm = [_read_json(p, "domain metrics") for p in sorted(d.glob("domains/*/metrics.json"))]
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


def _runs(runs: Sequence[RunResult | str | os.PathLike[str]]) -> list[RunResult]:
    out = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    if not out:
        raise ReportError("no runs to report")
    return out


# ---------------------------------------------------------------- formatting


def fmt(metric: str, x: float | None, *, signed: bool = False) -> str:
    """A score as the reports print it: 4 decimals (2 for PPL), '–' when absent or not finite."""
    if x is None or not math.isfinite(x):
        return _DASH
    return f"{x:{'+' if signed else ''}.{_DECIMALS.get(metric, 4)}f}"


def _what(metric: str, better: str) -> str:
    """'loss, nats, lower better' — a column's metric, unit and direction."""
    return ", ".join([_SHOW.get(metric, metric), *([_UNIT[metric]] if metric in _UNIT else []), better])


def _direction(hib: bool) -> str:
    return "higher better" if hib else "lower better"


def _table(header: list[str], rows: list[list[str]], markdown: bool, left: int = 1) -> str:
    """A markdown or aligned plain-text table; the first ``left`` columns are text, the rest numbers."""
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
        rule = ["---" if i < left else "---:" for i in range(len(header))]
        lines = [esc[0], rule, *esc[1:]]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in cells)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)]) + "\n"


def _extra_metrics(runs: Sequence[RunResult], primary: str) -> list[str]:
    return [m for m in METRICS if m != primary and any(m in r.metrics for r in runs)]


def results_table(runs: Sequence[RunResult | str | os.PathLike[str]], *, markdown: bool = True) -> str:
    """One row per run: OP, BWT (TRACE, GEM), forgetting, FWT on the primary metric, final means."""
    runs = _runs(runs)
    p = _common_primary(runs)
    hib = runs[0].higher_is_better(p)
    extra = _extra_metrics(runs, p)
    header = ["method", "routing", f"OP ({_what(p, _direction(hib))})",
              f"BWT TRACE 1/T ({_what(p, 'higher better')})",
              f"BWT GEM 1/(T-1) ({_what(p, 'higher better')})",
              f"forgetting ({_what(p, 'lower better')})", f"FWT ({_what(p, 'higher better')})",
              *(f"final mean {_what(m, _direction(m in ('exact_match', 'rougeL')))}" for m in extra),
              "train min"]
    rows = []
    for r in runs:
        s = r.summary(p) or {}
        label = r.label if r.complete else f"{r.label} ({r.finished}/{r.T} domains)"
        finals = []
        for m in extra:
            sm = r.summary(m) if m in r.metrics else None
            finals.append(fmt(m, sm["op"] if sm else None))
        rows.append([label, str(r.meta.get("method", {}).get("routing", _DASH)), fmt(p, s.get("op")),
                     fmt(p, s.get("bwt_trace"), signed=True), fmt(p, s.get("bwt_gem"), signed=True),
                     fmt(p, s.get("forgetting"), signed=True), fmt(p, s.get("fwt"), signed=True),
                     *finals, f"{r.train_seconds() / 60:.1f}"])
    return _table(header, rows, markdown, left=2)


def _common_primary(runs: Sequence[RunResult]) -> str:
    p = runs[0].primary
    lacking = [r.label for r in runs if p not in r.metrics]
    if lacking:
        raise ReportError(f"runs {', '.join(lacking)} have no {p!r} scores, the primary metric of "
                          f"{runs[0].label}; compare runs evaluated on the same metric")
    return p


# ---------------------------------------------------------------- report.md


_LEGEND = """\
## How to read this

R[t][i] is the score on domain i after training domain t. Differences are taken so that, for
every metric, **BWT < 0** and **forgetting > 0** mean earlier domains got worse.

- **OP** (overall performance, = AP = AA): mean final score over all domains, in the metric's own
  units and direction (for loss: lower is better).
- **BWT** (backward transfer): mean change on each domain between right after training it and the
  end. TRACE divides by T (the last domain contributes 0), GEM by T-1; BWT_TRACE = (T-1)/T BWT_GEM.
- **forgetting** (Chaudhry): per domain, best score since it was trained minus final score, averaged
  over the first T-1 domains; 0 is no forgetting, negative means the end is the best ever.
- **FWT** (forward transfer): mean gain on each domain, just before it is trained, over the base model.
- **plasticity**: the diagonal R[i][i], the score right after training domain i.
"""


def _meta_table(run: RunResult) -> str:
    m = run.meta
    method = m.get("method") or {}
    steps = m.get("steps_per_domain")
    rows = [
        ["model", str(m.get("model", _DASH))],
        ["method", ", ".join(f"{k}={v}" for k, v in method.items() if v is not None) or _DASH],
        ["domains", ", ".join(run.domains)],
        ["sources", ", ".join(map(str, m.get("sources") or [])) or _DASH],
        ["seed", str(m.get("seed", _DASH))],
        ["world size", str(m.get("world_size", _DASH))],
        ["global batch", str(m.get("global_batch", _DASH))],
        ["steps per domain", ", ".join(map(str, steps)) if isinstance(steps, list) else str(steps)],
        ["git commit", str(m.get("git_commit") or _DASH)],
        ["versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) or _DASH],
        ["command", f"`{m['command']}`" if m.get("command") else _DASH],
        ["started", str(m.get("started") or _DASH)],
        ["finished", str(m.get("finished") or "still running")],
    ]
    return _table(["field", "value"], rows, True, left=2)


def _matrix_table(run: RunResult) -> str:
    p, R, b = run.primary, run.R(), run.base()
    rows = [["base", *(fmt(p, x) for x in b)]] if b is not None else []
    for t, name in enumerate(run.domains):
        cells = [fmt(p, x) for x in R[t]] if t < run.finished else ["pending"] * run.T
        rows.append([f"after {name}", *cells])
    return _table(["after training \\ on", *run.domains], rows, True)


def _per_domain_table(run: RunResult) -> str:
    p, R, b = run.primary, run.R(), run.base()
    s = run.summary() or {}
    forg = s.get("forgetting_per_domain") or []
    rows = []
    for i, name in enumerate(run.domains):
        rows.append([
            name,
            fmt(p, b[i] if b is not None else None),
            fmt(p, R[i - 1, i] if 0 < i <= run.finished else None),
            fmt(p, R[i, i] if i < run.finished else None),
            fmt(p, R[-1, i] if run.complete else None),
            fmt(p, forg[i] if i < len(forg) else None, signed=True),
        ])
    w = _what(p, _direction(run.higher_is_better()))
    return _table(["domain", f"base ({w})", "before training it", "right after (plasticity)",
                   "final", "forgetting (lower better)"], rows, True)


def _timing_table(run: RunResult) -> str:
    rows, tot = [], np.zeros(4)
    for d in run.domain_metrics:
        v = [float(d.get(k) or 0.0) for k in ("train_seconds", "eval_seconds", "basis_seconds")]
        tot += [*v, d.get("steps") or 0]
        rows.append([str(d.get("domain", "?")), str(d.get("steps", _DASH)), *(f"{x:.1f}" for x in v),
                     str(d.get("bases_added", _DASH))])
    rows.append(["total", str(int(tot[3])), *(f"{x:.1f}" for x in tot[:3]), ""])
    return _table(["domain", "steps", "train s", "eval s", "basis s", "bases added"], rows, True)


def write_run_report(run_dir: RunResult | str | os.PathLike[str]) -> Path:
    """Write ``<run>/report.md`` and ``<run>/plots/{matrix,curves,training}.png``; return report.md."""
    run = run_dir if isinstance(run_dir, RunResult) else load_run(run_dir)
    plots = run.dir / "plots"
    from lora_cl.report_plots import plot_curves, plot_matrix, plot_training

    plot_matrix(run, plots / "matrix.png")
    plot_curves(run, plots / "curves.png")
    plot_training(run, plots / "training.png")
    status = ("complete" if run.complete
              else f"**still running or interrupted: {run.finished}/{run.T} domains trained**")
    s = run.summary()
    note = ("" if s or not run.complete else
            "\nSome scores are not finite (NaN or inf), so the summary metrics are left out.\n")
    text = "\n".join([
        f"# lora-cl run report: {run.label}\n",
        f"Status: {status}. Primary metric: {_SHOW.get(run.primary, run.primary)} "
        f"({_direction(run.higher_is_better())}).\n",
        "## Run\n", _meta_table(run),
        "## Results\n", results_table([run]) + note,
        f"## Score matrix R ({_what(run.primary, _direction(run.higher_is_better()))})\n",
        "Rows: after training each domain; columns: the domain evaluated.\n",
        _matrix_table(run),
        "## Per domain\n",
        "Before training it: transfer from earlier domains (FWT uses it); right after: plasticity; "
        "forgetting: Chaudhry, signed so that > 0 is worse.\n",
        _per_domain_table(run),
        "## Timings\n", _timing_table(run),
        "## Plots\n",
        "![score matrix](plots/matrix.png)\n",
        "![scores per domain over the stream](plots/curves.png)\n",
        "![training loss and projection](plots/training.png)\n",
        _LEGEND,
    ])
    out = run.dir / "report.md"
    atomic_write_text(out, text)
    return out


def _comparison_runs(out: Path, run_dirs: Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    if run_dirs is None:
        if (out / "compare.json").is_file():
            doc = _read_json(out / "compare.json", "comparison list")
            if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
                raise ReportError(f"{out / 'compare.json'}: expected {{\"runs\": [run names]}}")
            run_dirs = [str(x) for x in doc["runs"]]
        else:
            run_dirs = sorted(p.name for p in out.iterdir() if (p / "run.json").is_file())
    paths = [Path(p) if Path(p).is_absolute() or Path(p).exists() else out / p for p in run_dirs]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ReportError(f"{out}: runs listed for comparison are missing: {', '.join(missing)}; "
                          f"fix compare.json or pass run_dirs")
    if not paths:
        raise ReportError(f"{out}: no runs to compare (no compare.json and no subdirectory "
                          f"with run.json); pass the --out directory of `lora-cl train`")
    return paths


def write_comparison_report(out_dir: str | os.PathLike[str],
                            run_dirs: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """Write ``<out>/report.md`` and ``<out>/plots/{comparison,forgetting}.png`` over several runs.

    ``run_dirs`` defaults to ``compare.json``'s list, else every subdirectory with a run.json.
    Each run also gets its own report (:func:`write_run_report`).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ReportError(f"{out}: no such directory; pass the --out directory of `lora-cl train`")
    runs = [load_run(p) for p in _comparison_runs(out, run_dirs)]
    p = _common_primary(runs)
    for r in runs:
        write_run_report(r)
    from lora_cl.report_plots import plot_comparison, plot_forgetting

    plot_comparison(runs, out / "plots" / "comparison.png")
    plot_forgetting(runs, out / "plots" / "forgetting.png")
    links = [f"- [{r.label}]({Path(os.path.relpath(r.dir / 'report.md', out)).as_posix()})"
             + ("" if r.complete else f" ({r.finished}/{r.T} domains)") for r in runs]
    names = _domain_union(runs)
    frows = []
    for r in runs:
        f = _forgetting_by_domain(r, p)
        frows.append([r.label, *(fmt(p, f.get(n), signed=True) for n in names[:-1])])
    text = "\n".join([
        f"# lora-cl comparison: {out.resolve().name}\n",
        f"Primary metric: {_SHOW.get(p, p)}. Runs:\n", "\n".join(links) + "\n",
        "## Results\n", results_table(runs),
        f"## Forgetting per domain ({_what(p, 'lower better')})\n",
        _table(["method", *names[:-1]], frows, True),
        "## Plots\n",
        "![summary metrics per method](plots/comparison.png)\n",
        "![forgetting per domain and method](plots/forgetting.png)\n",
        _LEGEND,
    ])
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def _forgetting_by_domain(run: RunResult, metric: str) -> dict[str, float]:
    """Chaudhry forgetting of each of the run's first T-1 domains, by name (empty if unfinished)."""
    f = (run.summary(metric) or {}).get("forgetting_per_domain") or []
    return dict(zip(run.domains[: len(f)], f, strict=True))


def _domain_union(runs: Sequence[RunResult]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r.domains if n not in names]
    return names
