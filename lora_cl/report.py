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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_cl.paths import atomic_write_text
from lora_cl.run_results import (
    DASH,
    HIGHER_METRICS,
    SHOW,
    ReportError,
    RunResult,
    as_runs,
    common_primary,
    direction_label,
    domain_union,
    extra_metrics,
    fmt,
    forgetting_by_domain,
    load_run,
    read_json_file,
    what_label,
)

__all__ = ["ReportError", "RunResult", "fmt", "load_run", "results_table", "write_comparison_report",
           "write_run_report"]








# ---------------------------------------------------------------- formatting








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




def results_table(runs: Sequence[RunResult | str | os.PathLike[str]], *, markdown: bool = True) -> str:
    """One row per run: OP, BWT (TRACE, GEM), forgetting, FWT on the primary metric, final means."""
    runs = as_runs(runs)
    p = common_primary(runs)
    hib = runs[0].higher_is_better(p)
    extra = extra_metrics(runs, p)
    general = any(general_delta(r) is not None for r in runs)
    header = ["method", "routing", f"OP ({what_label(p, direction_label(hib))})",
              f"BWT TRACE 1/T ({what_label(p, 'higher better')})",
              f"BWT GEM 1/(T-1) ({what_label(p, 'higher better')})",
              f"forgetting ({what_label(p, 'lower better')})", f"FWT ({what_label(p, 'higher better')})",
              *(f"final mean {what_label(m, direction_label(m in HIGHER_METRICS))}" for m in extra),
              *(["general Δ (held-out loss of eval.general, final - base; > 0: lost)"] if general else []),
              "train min"]
    rows = []
    for r in runs:
        s = r.summary(p) or {}
        label = r.label if r.complete else f"{r.label} ({r.finished}/{r.T} domains)"
        finals = []
        for m in extra:
            sm = r.summary(m) if m in r.metrics else None
            finals.append(fmt(m, sm["op"] if sm else None))
        rows.append([label, str(r.meta.get("method", {}).get("routing", DASH)), fmt(p, s.get("op")),
                     fmt(p, s.get("bwt_trace"), signed=True), fmt(p, s.get("bwt_gem"), signed=True),
                     fmt(p, s.get("forgetting"), signed=True), fmt(p, s.get("fwt"), signed=True),
                     *finals, *([fmt("loss", general_delta(r), signed=True)] if general else []),
                     f"{r.train_seconds() / 60:.1f}"])
    return _table(header, rows, markdown, left=2)


def general_delta(run: RunResult, metric: str = "loss") -> float | None:
    """eval.general's ``metric`` after the last finished domain minus the base model's (None
    without an eval.general set)."""
    base = (run.base_eval or {}).get("general") or {}
    after = [d["general"][metric] for d in run.domain_metrics if metric in (d.get("general") or {})]
    if metric not in base or not after:
        return None
    return float(after[-1]) - float(base[metric])




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
        ["model", str(m.get("model", DASH))],
        ["method", ", ".join(f"{k}={v}" for k, v in method.items() if v is not None) or DASH],
        ["domains", ", ".join(run.domains)],
        ["sources", ", ".join(map(str, m.get("sources") or [])) or DASH],
        ["seed", str(m.get("seed", DASH))],
        ["world size", str(m.get("world_size", DASH))],
        ["global batch", str(m.get("global_batch", DASH))],
        ["steps per domain", ", ".join(map(str, steps)) if isinstance(steps, list) else str(steps)],
        ["git commit", str(m.get("git_commit") or DASH)],
        ["versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) or DASH],
        ["command", f"`{m['command']}`" if m.get("command") else DASH],
        ["started", str(m.get("started") or DASH)],
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
    kinds = _leak_kinds(run)
    rows = []
    for i, name in enumerate(run.domains):
        d = run.domain_metrics[i] if i < len(run.domain_metrics) else {}
        leak = d.get("protection_leak") or {}
        rows.append([
            name,
            fmt(p, b[i] if b is not None else None),
            fmt(p, R[i - 1, i] if 0 < i <= run.finished else None),
            fmt(p, R[i, i] if i < run.finished else None),
            fmt(p, R[-1, i] if run.complete else None),
            fmt(p, forg[i] if i < len(forg) else None, signed=True),
            _projected(d),
            *(f"{leak[k]:.1%}" if leak.get(k) is not None else DASH for k in kinds),
        ])
    w = what_label(p, direction_label(run.higher_is_better()))
    return _table(["domain", f"base ({w})", "before training it", "right after (plasticity)",
                   "final", "forgetting (lower better)", "tensors projected",
                   *(f"leak {'other weights' if k == 'other' else k}" for k in kinds)], rows, True)


def _leak_kinds(run: RunResult) -> tuple[str, ...]:
    """The leak columns: lora_A and lora_B; "other" alone for a fully finetuned model's weights."""
    seen = {k for d in run.domain_metrics for k, v in (d.get("protection_leak") or {}).items()
            if v is not None}
    if "other" not in seen:
        return ("lora_A", "lora_B")
    return ("lora_A", "lora_B", "other") if seen & {"lora_A", "lora_B"} else ("other",)


def _projected(domain: dict[str, Any]) -> str:
    """The tensors the projection covered at the domain's last logged step ("0": it covered none)."""
    seen = [h["projection/projected_tensors"] for h in domain.get("log_history", [])
            if "projection/projected_tensors" in h]
    return str(int(seen[-1])) if seen else DASH


def _timing_table(run: RunResult) -> str:
    rows, tot = [], np.zeros(4)
    for d in run.domain_metrics:
        v = [float(d.get(k) or 0.0) for k in ("train_seconds", "eval_seconds", "basis_seconds")]
        tot += [*v, d.get("steps") or 0]
        rows.append([str(d.get("domain", "?")), str(d.get("steps", DASH)), *(f"{x:.1f}" for x in v),
                     str(d.get("bases_added", DASH))])
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
        f"Status: {status}. Primary metric: {SHOW.get(run.primary, run.primary)} "
        f"({direction_label(run.higher_is_better())}).\n",
        "## Run\n", _meta_table(run),
        "## Results\n", results_table([run]) + note,
        f"## Score matrix R ({what_label(run.primary, direction_label(run.higher_is_better()))})\n",
        "Rows: after training each domain; columns: the domain evaluated.\n",
        _matrix_table(run),
        "## Per domain\n",
        "Before training it: transfer from earlier domains (FWT uses it); right after: plasticity; "
        "forgetting: Chaudhry, signed so that > 0 is worse. Tensors projected: how many routed "
        "tensors the projection covered at the domain's last logged step (0 on a later domain: "
        "protection covered nothing). Leak: the share of the domain's update (its adapter delta, "
        "||P dW|| / ||dW||) inside the earlier domains' protected subspace, per LoRA factor; "
        "0 means protection held exactly (hard projection with re-projected updates).\n",
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
            doc = read_json_file(out / "compare.json", "comparison list")
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
    p = common_primary(runs)
    for r in runs:
        write_run_report(r)
    from lora_cl.report_plots import plot_comparison, plot_forgetting

    plot_comparison(runs, out / "plots" / "comparison.png")
    plot_forgetting(runs, out / "plots" / "forgetting.png")
    links = [f"- [{r.label}]({Path(os.path.relpath(r.dir / 'report.md', out)).as_posix()})"
             + ("" if r.complete else f" ({r.finished}/{r.T} domains)") for r in runs]
    names = domain_union(runs)
    frows = []
    for r in runs:
        f = forgetting_by_domain(r, p)
        frows.append([r.label, *(fmt(p, f.get(n), signed=True) for n in names[:-1])])
    text = "\n".join([
        f"# lora-cl comparison: {out.resolve().name}\n",
        f"Primary metric: {SHOW.get(p, p)}. Runs:\n", "\n".join(links) + "\n",
        "## Results\n", results_table(runs),
        f"## Forgetting per domain ({what_label(p, 'lower better')})\n",
        _table(["method", *names[:-1]], frows, True),
        "## Plots\n",
        "![summary metrics per method](plots/comparison.png)\n",
        "![forgetting per domain and method](plots/forgetting.png)\n",
        _LEGEND,
    ])
    path = out / "report.md"
    atomic_write_text(path, text)
    return path




