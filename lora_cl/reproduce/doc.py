"""``docs/reproduction.md``: every table, plot and verdict regenerated from the cached cells.

Nothing here holds a result: each number is read from a run directory or a part 1 JSON file,
then summarised (mean, 95% t-interval over seeds, paired differences) and written out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lora_cl.methods import resolve_method
from lora_cl.optim.routed_adamw import ROUTINGS
from lora_cl.paths import atomic_write_text
from lora_cl.reproduce import claims as C
from lora_cl.reproduce import plots
from lora_cl.reproduce.collect import (
    LM_COLUMNS,
    QA_COLUMNS,
    CellResult,
    by_method,
    data_passes,
    eta_vs_forgetting,
    forgetting_nats,
    load_cells,
    mean_matrix,
    method_stats,
    pearson,
    replay_evidence,
)
from lora_cl.reproduce.grid import (
    LONGER_FACTOR,
    LONGER_METHODS,
    METHODS,
    OVERLAP_STREAMS,
    PARTS,
    STREAM_NOTES,
    STREAMS,
    EVAL_SECONDS_4x128,
    Settings,
    STEP_SECONDS_4x128,
    estimate_prop1_seconds,
    estimate_run_seconds,
    longer_cache,
    longer_settings,
    part_cells,
    runnable,
    stream_sources,
)
from lora_cl.reproduce.runner import is_complete, prop1_paths
from lora_cl.reproduce.stats import MeanCI, Paired, mean_ci, paired

DEFAULT_CACHE = "benchmarks/reproduction/cells"


def command(settings: Settings, cache: Path, *extra: str, docs: Path | None = None) -> str:
    """The exact command line for these settings, cache and (when not ``docs/``) report folder."""
    words = ["lora-cl", "reproduce", *extra]
    if settings.quick:
        words.append("--quick")
    if settings.model != "smollm2-135m":
        words += ["--model", settings.model]
    from lora_cl.reproduce.grid import default_settings

    default = default_settings(quick=settings.quick, model=settings.model)
    if settings.steps != default.steps:
        words += ["--steps", str(settings.steps)]
    if settings.seq_len != default.seq_len:
        words += ["--seq-len", str(settings.seq_len)]
    if settings.seeds != default.seeds:
        words += ["--seeds", str(len(settings.seeds))]
    if str(cache) != DEFAULT_CACHE:
        words += ["--cache", str(cache)]
    if docs is not None and Path(docs) != Path("docs"):
        words += ["--docs", str(docs)]
    return " ".join(words)


def _ci(s: MeanCI | None, d: int = 4) -> str:
    if s is None or s.mean is None:
        return "–"
    if s.lo is None:
        return f"{s.mean:.{d}g}"
    return f"{s.mean:.{d}g} [{s.lo:.{d}g}, {s.hi:.{d}g}]"


def _paired_cells(pr: Paired) -> list[str]:
    """A paired comparison's table cells: seeds, mean [95% CI], p of the paired t-test."""
    return [str(pr.ci.n), _ci(pr.ci), "–" if pr.p_value is None else f"{pr.p_value:.3g}"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if is_complete(path) else None


class Report:
    """Collects the cached results of every part once, then renders the sections."""

    def __init__(self, cache: Path, settings: Settings, docs: Path) -> None:
        self.cache, self.settings, self.docs = Path(cache), settings, Path(docs)
        self.figs = self.docs / "reproduction"
        self.cells = {p: part_cells(p, settings) for p in PARTS if PARTS[p].streams}
        self.results: list[CellResult] = load_cells([c for cs in self.cells.values() for c in cs], self.cache)
        # the larger grid: part 2's stream at LONGER_FACTOR x the steps, in its own cache
        self.longer_settings, self.longer_cache = longer_settings(settings), longer_cache(self.cache)
        self.longer_cells = part_cells(2, self.longer_settings, LONGER_METHODS)
        self.longer: list[CellResult] = load_cells(self.longer_cells, self.longer_cache)
        paths = prop1_paths(self.cache, settings)
        self.synthetic = _read(paths.pop("synthetic"))
        self.real = [d for p in paths.values() if (d := _read(p)) is not None]
        self.claims = C.all_claims(self.results, self.synthetic, self.real,
                                   partial(command, settings, self.cache, docs=self.docs))

    # -- header ------------------------------------------------------------------------
    def header(self) -> str:
        s = self.settings
        used = sum(r.seconds for r in [*self.results, *self.longer])
        used += sum(float(d.get("train_seconds", 0)) for d in [self.synthetic, *self.real] if d)
        done = {r.cell.run_dir(self.cache) for r in self.results}
        prop1_done = (self.synthetic is not None) + len(self.real)
        prop1_run = estimate_prop1_seconds(s)
        total_est = len(s.seeds) * prop1_run
        left_est = (len(s.seeds) - len(self.real)) * prop1_run
        est_rows = [["1", "prop1", f"{1 + len(s.seeds)}", f"{prop1_done}", _hours(total_est),
                     _hours(left_est)]]
        seen: set[Path] = set()
        for p, cells in self.cells.items():
            new = [c for c in cells if c.run_dir(self.cache) not in seen]
            seen.update(c.run_dir(self.cache) for c in cells)
            left = [c for c in new if c.run_dir(self.cache) not in done]
            secs = sum(estimate_run_seconds(c.stream, s) for c in new)
            left_secs = sum(estimate_run_seconds(c.stream, s) for c in left)
            total_est += secs
            left_est += left_secs
            shared = len(cells) - len(new)
            est_rows.append([str(p), ", ".join(PARTS[p].streams),
                             f"{len(cells)}" + (f" ({shared} from earlier parts)" if shared else ""),
                             f"{len(new) - len(left)}", _hours(secs), _hours(left_secs)])
        stream2, n_long = PARTS[2].streams[0], len(self.longer_cells)
        per_cell = estimate_run_seconds(stream2, self.longer_settings)
        longer_secs, longer_left = n_long * per_cell, (n_long - len(self.longer)) * per_cell
        total_est += longer_secs
        left_est += longer_left
        est_rows.append([f"2, larger grid ({self.longer_settings.steps} steps per domain)", stream2,
                         str(n_long), str(len(self.longer)), _hours(longer_secs), _hours(longer_left)])
        one8 = estimate_run_seconds("lm8", s)
        return "\n".join([
            "# Reproduction on real data: decoupled moment routing and Proposition 1", "",
            f"Generated by `{command(s, self.cache, '--report', docs=self.docs)}` from the cached cells in "
            f"`{self.cache}`; no number in this file is typed by hand, and nothing was tuned toward "
            "the paper's numbers. Regenerate the whole grid with "
            f"`{command(s, self.cache, docs=self.docs)}` (cells already finished are skipped).", "",
            self.regimes_section(),
            f"**At a glance** (the short regime below): of the paper's {len(self.claims)} claims in "
            f"[part 7](#part-7-the-papers-claims-beside-the-measurements), {C.tally(self.claims)}.", "",
            f"Settings: model `{s.model}` (data: {s.data}), seeds {list(s.seeds)}, "
            f"{s.steps} steps per domain, batch {s.batch_size} x seq {s.seq_len}, lr {s.lr:g} "
            f"(constant, Adam betas 0.9/0.999), LoRA r={s.lora_r} alpha={s.lora_alpha} on "
            f"{', '.join(s.targets)}, {s.eval_examples} held-out examples per domain"
            + (" — QUICK settings: a smoke test, not evidence" if s.quick else "") + ".", "",
            f"Compute used by the cached cells: **{_hours(used)}** (train + eval + basis seconds from "
            "every domain's metrics.json, plus part 1). These are wall-clock seconds: a cell trained "
            "while other jobs shared the machine, or while it was paused for them, records the wait "
            "too, so read them as an upper bound; the estimate below uses the measured undisturbed "
            "step time.", "",
            f"Where the finished cells ran (each cell's run.json): {self._platforms()}.", "",
            f"Estimated compute on 2 CPU cores ({STEP_SECONDS_4x128:g} s per 4x128 training step, "
            f"{EVAL_SECONDS_4x128:g} s per 4x128 eval forward, measured; generation cost assumed): "
            f"one 8-domain run ~{_hours(one8)}; "
            f"the whole grid ~{_hours(total_est)}, of which ~{_hours(left_est)} is not finished yet.",
            "",
            _table(["part", "stream", "cells", "finished", "estimate (all)", "estimate (not finished)"],
                   est_rows), "",
        ])

    def regimes_section(self) -> str:
        """The answer first: the time-scale-matched regimes' verdicts, each linking its page."""
        from lora_cl.reproduce.regime import REGIMES, regime_cache, regime_settings
        from lora_cl.reproduce.regime_doc import RegimePage, page_path

        out = ["## The answer: decoupled against shared routing where Adam's horizon fits the stream", "",
               "Every cell of the parts below (the *short regime*) runs 40-120 steps per domain with "
               "beta2 = 0.999, whose ~1,000-step horizon is longer than the whole stream, so Adam's v "
               "never comes to reflect the current domain and routing acts on a small share of it: "
               "those parts cannot tell whether decoupled routing keeps protection that shared routing "
               "loses. The time-scale-matched regimes can; every figure here is generated from their "
               "cells.", ""]
        pages = {regime: RegimePage(regime_cache(self.cache),
                                    regime_settings(regime, quick=self.settings.quick), self.docs, regime)
                 for regime in REGIMES}
        shorts = {regime: page.in_short() for regime, page in pages.items()}
        questions = list(dict.fromkeys(q for short in shorts.values() for q in short))
        out += [_plain_answer(pages), ""]
        out += ["In short, per regime (% of vanilla's forgetting, mean [95% CI] over seeds, paired by "
                "seed; negative: the first run forgets less; *holds*: Holm-corrected over the regime "
                "page's claims; the lr line is descriptive, outside the Holm family):", "",
                _table(["", *(f"[regime ({r})]({page_path(r).as_posix()})" for r in REGIMES)],
                       [[q, *(shorts[r].get(q, "—") for r in REGIMES)] for q in questions]), ""]
        for regime, page in pages.items():
            link = page_path(regime).as_posix()
            out += [f"**Regime ({regime})** ([its page]({link})): {page.answer()}", ""]
        return "\n".join(out)

    def _platforms(self) -> str:
        counts: dict[str, int] = {}
        for r in [*self.results, *self.longer]:
            counts[r.platform] = counts.get(r.platform, 0) + 1
        if not counts:
            return "no finished cells yet"
        return "; ".join(f"{k}: {n} cell{'s' if n != 1 else ''}" for k, n in sorted(counts.items()))

    # -- part 1 --------------------------------------------------------------------------
    def part1(self) -> str:
        s = self.settings
        out = [self._title(1), f"Command: `{command(s, self.cache, '--only', '1', docs=self.docs)}`", ""]
        if self.synthetic is None and not self.real:
            return "\n".join(out + [f"not run yet (0 of {1 + len(s.seeds)} cells)", ""])
        if self.synthetic is not None:
            rows = [[k, f"{p['alpha']:.1f}", f"{p['lr_ratio']:.3f}", f"{p['lr_ratio_predicted']:.3f}",
                     f"{100 * p['lr_rel_error']:.1f}%", f"{p['v_ratio']:.3f}",
                     f"{p['v_ratio_predicted']:.3f}"]
                    for k, pts in self.synthetic["results"].items() for p in pts]
            out += [f"Synthetic (`lora_cl.diagnostics.prop1`, {self.synthetic['steps']} steps per run, "
                    f"noise overlap {self.synthetic['overlap']}):", "",
                    _table(["basis", "alpha", "R_eta", "1/(1-alpha)", "rel. err", "R_v", "1/(1-alpha)^2"],
                           rows), ""]
        if self.real:
            doc0 = self.real[0]
            out.append(f"Real LoRA training (`lora_cl.reproduce.prop1_real`): {doc0['prev_steps']} steps "
                       f"on {doc0['domains'][0]!r} build its rank-32 gradient bases, then "
                       f"{doc0['steps']} steps on {doc0['domains'][1]!r} per (alpha, routing), measured "
                       f"over the last {doc0['measured_over_steps']}; mean [95% CI] over seeds "
                       f"{[d['seed'] for d in self.real]}. R_dW = old-direction update norm ratio.")
            rows = []
            for i, p in enumerate(doc0["points"]):
                vals = {k: mean_ci([d["points"][i]["groups"]["all"][k] for d in self.real
                                    if d["points"][i]["groups"].get("all", {}).get(k) is not None])
                        for k in ("lr_ratio", "v_ratio", "update_ratio")}
                rows.append([f"{p['alpha']:.1f}", _ci(vals["lr_ratio"]), f"{p['predicted_lr_ratio']:.3f}",
                             _ci(vals["update_ratio"]), _ci(vals["v_ratio"]),
                             f"{p['predicted_v_ratio']:.3f}"])
            out += ["", _table(["alpha", "R_eta", "1/(1-alpha)", "R_dW", "R_v", "1/(1-alpha)^2"], rows), ""]
        plots.prop1(self.synthetic, self.real, self.figs / "prop1.png")
        out += ["![Proposition 1](reproduction/prop1.png)", ""]
        return "\n".join(out)

    # -- stream parts ---------------------------------------------------------------------
    def _title(self, p: int) -> str:
        return f"## Part {p}: {PARTS[p].title}\n"

    def _status(self, p: int) -> tuple[int, int, str | None]:
        cells = self.cells[p]
        done = sum(c.complete(self.cache) for c in cells)
        why = next((w for c in cells if (w := runnable(c.stream, self.settings))), None)
        return done, len(cells), why

    def _method_table(self, p: int, stream: str) -> tuple[str, dict[str, dict[str, MeanCI]]]:
        columns = QA_COLUMNS if STREAMS[stream][1] == "sft" else LM_COLUMNS
        stats = {h: method_stats(self.results, stream, f) for h, f in columns}
        seeds = by_method(self.results, stream, forgetting_nats)
        rows = []
        for m in PARTS[p].methods:
            if not any(m in stats[h] for h, _ in columns) and m not in seeds:
                rows.append([m, "0"] + ["not run yet"] * len(columns))
                continue
            n = max((stats[h][m].n for h, _ in columns if m in stats[h]), default=0)
            rows.append([m, str(n)] + [_ci(stats[h].get(m)) for h, _ in columns])
        return _table(["method", "seeds", *(h for h, _ in columns)], rows), stats

    def _paired_rows(self, stream: str, pairs: Sequence[tuple[str, str]]) -> str:
        vals = by_method(self.results, stream, forgetting_nats)
        rows = []
        for a, b in pairs:
            if a not in vals or b not in vals:
                continue
            rows.append([f"{a} - {b}", *_paired_cells(paired(vals[a], vals[b]))])
        if not rows:
            return ""
        return ("Paired differences of forgetting (nats) over common seeds (> 0: the second forgets "
                "less):\n\n" + _table(["a - b", "seeds", "mean [95% CI]", "p (paired t)"], rows) + "\n")

    def stream_part(self, p: int, pairs: Sequence[tuple[str, str]] = ()) -> str:
        s = self.settings
        out = [self._title(p), f"Command: `{command(s, self.cache, '--only', str(p), docs=self.docs)}`", ""]
        done, total, why = self._status(p)
        for stream in PARTS[p].streams:
            names = self._domain_names(stream)
            out.append(f"Stream `{stream}` ({len(names)} domains): {', '.join(names)}.")
            if stream in STREAM_NOTES:
                out.append(f"\n{STREAM_NOTES[stream]}")
            if passes := self._passes_line(stream):
                out.append(f"\n{passes}")
        reasons = [r for r in (self._baseline_reason(PARTS[p].shared_baseline), PARTS[p].note) if r]
        if reasons:
            out.append(f"\nMethods: {', '.join(PARTS[p].methods)}; {'; '.join(reasons)}.")
        if why:
            out.append(f"\nnot runnable with these settings: {why}.")
        if done == 0:
            return "\n".join(out + ["", f"not run yet (0 of {total} cells)", ""])
        if done < total:
            out.append(f"\npartial: {done} of {total} cells finished; CIs cover the finished seeds.")
        dirs = {c.run_dir(self.cache) for c in self.cells[p]}
        secs = sum(r.seconds for r in self.results if r.cell.run_dir(self.cache) in dirs)
        out.append(f"\nCompute of these cells: {_hours(secs)} wall-clock (an upper bound, see above). "
                   "Values: mean [95% t-CI] over seeds.\n")
        for stream in PARTS[p].streams:
            table, stats = self._method_table(p, stream)
            out += [table, ""]
            best = C.best_shared(self.results, stream)
            base_pairs = list(pairs) + ([(best, "ogp")] if best and "ogp" in PARTS[p].methods else [])
            out.append(self._paired_rows(stream, base_pairs))
            out.append(self._replay_section(p, stream))
            fig = self.figs / f"part{p}-{stream}.png"
            first = {h: stats[h] for h in list(stats)[:3] if stats[h]}
            if first:
                plots.bars(first, fig, f"part {p}: {stream}")
                out += [f"![part {p}](reproduction/{fig.name})", ""]
            if STREAMS[stream][1] == "sft":
                out.append(self._r_matrix_section(p, stream))
        return "\n".join(out)

    def _passes_line(self, stream: str, results: Sequence[CellResult] | None = None,
                     settings: Settings | None = None) -> str:
        """How much of each domain's training slice the steps cover (read from the cells' logs), so
        a reader sees the scale of the run ("" before any cell has finished); ``results`` and
        ``settings`` default to the main grid's."""
        passes = data_passes(self.results if results is None else results, stream)
        if not passes:
            return ""
        s = settings or self.settings
        lo, hi = min(passes, key=lambda x: x[1]), max(passes, key=lambda x: x[1])
        return (f"Data per domain: {s.steps} steps of {s.batch_size} sequences of at most {s.seq_len} "
                f"tokens make {lo[1]:.2f} ({lo[0]}) to {hi[1]:.2f} ({hi[0]}) passes over the domain's "
                "training slice (the Trainer's epoch at the domain's last step).")

    def longer_section(self) -> str:
        """The larger grid beside part 2: the same stream, settings and seeds at LONGER_FACTOR x the
        steps per domain for LONGER_METHODS, each method and each paired difference at both
        lengths (each length over its own finished seeds), and a plot of both."""
        s, ls, stream = self.settings, self.longer_settings, PARTS[2].streams[0]
        out = [f"### The larger grid: {ls.steps} steps per domain\n",
               f"Command: `{command(s, self.cache, '--longer', docs=self.docs)}` (its cells are in "
               f"`{self.longer_cache}`; the {s.steps}-step cells are part 2's above).", "",
               f"Part 2's stream, settings and seeds at {LONGER_FACTOR}x the steps per domain, for "
               f"{', '.join(LONGER_METHODS)}: does what part 2 measured hold with more training? "
               f"Sequences stay at {ls.seq_len} tokens: each domain's training slice is fixed, so "
               "more tokens per domain would repeat its data rather than add to it."]
        if passes := self._passes_line(stream, self.longer, ls):
            out.append(f"\n{passes}")
        done, total = len(self.longer), len(self.longer_cells)
        if done == 0:
            return "\n".join(out + ["", f"not run yet (0 of {total} cells)", ""])
        if done < total:
            out.append(f"\npartial: {done} of {total} cells finished; CIs cover the finished seeds.")
        secs = sum(r.seconds for r in self.longer)
        out.append(f"\nCompute of these cells: {_hours(secs)} wall-clock (an upper bound, see above). "
                   "Values: mean [95% t-CI] over each length's finished seeds.\n")
        columns = dict(LM_COLUMNS)
        metrics = ("forgetting (nats)", "avg final PPL", "final train loss")
        lengths = {s.steps: self.results, ls.steps: self.longer}
        stats = {(h, n): {m: v for m, v in method_stats(res, stream, columns[h]).items()
                          if m in LONGER_METHODS}
                 for h in metrics for n, res in lengths.items()}
        forget = stats["forgetting (nats)", s.steps], stats["forgetting (nats)", ls.steps]
        rows = []
        for m in LONGER_METHODS:
            short, long_ = forget[0].get(m), forget[1].get(m)
            ratio = f"{long_.mean / short.mean:.2f}" if short and long_ and short.mean else "–"
            rows.append([m, f"{short.n if short else 0} / {long_.n if long_ else 0}",
                         *(_ci(stats[h, n].get(m)) for h in metrics[:1] for n in lengths), ratio,
                         *(_ci(stats[h, n].get(m)) for h in metrics[1:] for n in lengths)])
        head = [f"{h}, {n} steps" for h in metrics[:1] for n in lengths]
        head += [f"forgetting x ({ls.steps} / {s.steps})"]
        head += [f"{h}, {n} steps" for h in metrics[1:] for n in lengths]
        out += [_table(["method", f"seeds ({s.steps} / {ls.steps})", *head], rows), ""]
        vals = {n: by_method(res, stream, forgetting_nats) for n, res in lengths.items()}
        prow = []
        for a, b in (("vanilla", "gpm"), ("vanilla", "ogp"), ("gpm", "ogp")):
            cells, means = [], []
            for n in lengths:
                if a in vals[n] and b in vals[n]:
                    pr = paired(vals[n][a], vals[n][b])
                    cells += _paired_cells(pr)
                    means.append(pr.ci.mean)
                else:
                    cells += ["0", "–", "–"]
            sign = ("–" if len(means) < 2 else
                    "kept" if (means[0] > 0) == (means[1] > 0) else "flips")
            prow.append([f"{a} - {b}", *cells, sign])
        phead = [f"{w}, {n} steps" for n in lengths for w in ("seeds", "mean [95% CI]", "p (paired t)")]
        out += ["Paired differences of forgetting (nats) at both lengths (> 0: the second forgets less; "
                "the sign column says whether the order of the two methods is the same at both):", "",
                _table(["a - b", *phead, "sign"], prow), ""]
        fig = self.figs / f"part2-{stream}-longer.png"
        plots.by_steps({h: {n: stats[h, n] for n in lengths} for h in metrics[:2]}, fig,
                       f"part 2: {stream} at {s.steps} and {ls.steps} steps per domain")
        out += [f"![part 2 at {ls.steps} steps](reproduction/{fig.name})", ""]
        return "\n".join(out)

    def _baseline_reason(self, method: str) -> str:
        """Why ``method`` is a part's shared-projection baseline, read from part 2's cells ("" for
        no method)."""
        if not method:
            return ""
        stream = PARTS[2].streams[0]
        best = C.best_shared(self.results, stream)
        head = f"{method} is the shared-projection baseline"
        if best is None:
            return head + f" (part 2 has no finished shared method on {stream} yet)"
        if best != method:
            return head + f", but {best} now forgets least of the shared methods in part 2"
        seeds = len(by_method(self.results, stream, forgetting_nats)[method])
        return head + f" because it forgot least of the shared methods in part 2 ({seeds} seeds)"

    def _replay_section(self, p: int, stream: str) -> str:
        """Why replay forgets: its buffer's loss at the end against the held-out loss of the same
        earlier domains, beside vanilla's and the base model's (all read from the cells)."""
        ev = replay_evidence(self.results, stream, PARTS[p].methods)
        if not ev:
            return ""
        spec = resolve_method(METHODS[next(k for k in ev if k != "vanilla")].preset)
        rows = [[label, str(e.cells), ", ".join(map(str, sorted(set(e.examples)))) or "–",
                 _ci(e.buffer_loss), _ci(e.held_out), f"{e.base:.4g}"] for label, e in ev.items()]
        return (f"Replay buffer ({spec.replay_fraction:.1%} of each earlier domain's training examples, "
                f"mixed at rho = {spec.rho:g}): the loss on the replay batch at the last training log "
                "against the final held-out loss of the same earlier domains (domains 1..T-1), beside "
                "vanilla's and the base model's (the same on every seed). A buffer loss far below the "
                "held-out loss means the few buffered examples were memorised rather than the domains "
                "kept.\n\n"
                + _table(["method", "cells", "buffer (examples)", "buffer loss (nats)",
                          "held-out loss, earlier domains", "base model, same domains"], rows) + "\n")

    def _domain_names(self, stream: str) -> list[str]:
        return [d.get("name") or d["source"].partition(":")[2] for d in stream_sources(stream, self.settings)]

    def _r_matrix_section(self, p: int, stream: str) -> str:
        """Per-task R matrices of a Q/A stream, exact match and held-out loss: the diagonal and the
        last row per method (table), every entry (heatmaps), each the mean over finished seeds."""
        names = self._domain_names(stream)
        out = []
        for metric, label, digits in (("exact_match", "exact match", 2), ("loss", "held-out loss (nats)", 3)):
            mats = {m: got for m in PARTS[p].methods if (got := mean_matrix(self.results, stream, m, metric))}
            if not mats:
                continue
            rows = []
            for m, (R, n) in mats.items():
                rows.append([m, "just learnt (`R[j][j]`)", str(n),
                             *(f"{R[i][i]:.{digits}f}" for i in range(len(R)))])
                rows.append([m, "after the last task (`R[T][j]`)", str(n),
                             *(f"{x:.{digits}f}" for x in R[-1])])
            fig = self.figs / f"part{p}-{stream}-R-{metric}.png"
            plots.r_matrices({m: R for m, (R, _) in mats.items()}, names, fig,
                             f"part {p}: {stream}, {label} (row: after task i; column: task j)",
                             unit_range=metric == "exact_match")
            out += [f"Per-task R matrix of {label} (`R[i][j]`: task j after training task i; mean over "
                    "the finished seeds; each cell's `matrix_*.csv` holds them per seed):", "",
                    _table(["method", "row", "seeds", *names], rows), "",
                    f"![part {p} R matrices, {label}](reproduction/{fig.name})", ""]
        return "\n".join(out)

    def part3_overlap(self) -> str:
        # per stream, per finished cell (method, seed): the overlaps logged during domains 2..T
        per_cell = {stream: {(r.cell.method.label, r.cell.seed): xs for r in self.results
                             if r.cell.stream == stream if (xs := [x for dom in r.overlaps[1:] for x in dom])}
                    for stream in OVERLAP_STREAMS}
        samples = {stream: [x for xs in cells.values() for x in xs] for stream, cells in per_cell.items()}
        rows = []
        for stream, xs in samples.items():
            if xs:
                q = sorted(xs)
                rows.append([stream, str(len(xs)), f"{sum(xs) / len(xs):.3f}", f"{q[len(q) // 10]:.3f}",
                             f"{q[len(q) // 2]:.3f}", f"{q[(9 * len(q)) // 10]:.3f}"])
        if not rows:
            return "No logged overlaps yet (they come from projection methods' log_history).\n"
        plots.overlap_hist(samples, self.figs / "overlap.png")
        return ("Overlap s_t = ||G U||^2 / ||G||^2 logged during training of domains 2..T by every "
                "projection method (`projection/overlap`), per stream:\n\n"
                + _table(["stream", "logged values", "mean", "p10", "median", "p90"], rows)
                + "\n\n" + _overlap_verdict(per_cell) + "\n\n![overlap](reproduction/overlap.png)\n")

    def _moments_legend(self, p: int) -> str:
        """What each method of part ``p`` feeds Adam's two moments, from its routing and lr factor."""
        grad = {"raw": "g", "mod": "g~"}
        rows = []
        for label in PARTS[p].methods:
            run = METHODS[label]
            spec = resolve_method(run.preset, run.overrides)
            m_in, v_in = ROUTINGS[spec.routing]
            m, v = grad[m_in], grad[v_in] + "^2"
            lr = "lr" if run.lr_scale == 1 else f"lr x {run.lr_scale:g}"
            if label == "ogp-fixed-v_scaled":  # the equivalence tested in test_routed_adamw.py
                lr += f" (= v on (1 - alpha)^2 g^2 at lr, alpha = {spec.alpha:g})"
            rows.append([label, spec.routing, f"`{m}`", f"`{v}`", lr])
        return ("What each method feeds Adam's moments (g: the raw gradient, g~: the projected one):\n\n"
                + _table(["method", "routing", "m fed", "v fed", "learning rate"], rows) + "\n")

    def part6(self) -> str:
        text = self.stream_part(6, [("adam-nscl", "ogp-fixed"), ("adam-nscl", "adam-nscl-lr-matched"),
                                    ("adam-nscl", "ogp-fixed-v_only"), ("ogp-fixed-v_scaled", "ogp-fixed")])
        c = C.lr_matching_claim(self.results)
        return (text + "\n" + self._moments_legend(6)
                + f"\nEffective-LR matching: {c.measured} — {c.verdict}.\n\n" + self._eta_section(6, "lm8"))

    def _eta_section(self, p: int, stream: str) -> str:
        """Does forgetting track R_eta? Per method the logged old-direction effective LR relative to
        ogp-fixed's (same seed) beside forgetting, Pearson's r over cells, and a scatter plot."""
        head = ("**Does forgetting track R_eta?** The callback logs Adam's effective learning rate "
                "along the old subspaces (`probe/old_direction_lr`, lr / sqrt(v_hat) averaged over "
                "the protected directions) during domains 2..T. R_eta is a cell's mean of it over "
                "ogp-fixed's on the same seed (decoupled routing = 1). `ogp-fixed-v_scaled` feeds v "
                "with (1 - alpha)^2 g^2, run as ogp-fixed at lr / (1 - alpha).\n\n")
        rows = eta_vs_forgetting(self.results, stream, PARTS[p].methods)
        if not rows:
            return head + "not measured yet: no part 6 cells with probes.\n"
        table = []
        for m in dict.fromkeys(r[0] for r in rows):
            mine = [r for r in rows if r[0] == m]
            table.append([m, str(len(mine)), _ci(mean_ci([r[2] for r in mine])),
                          _ci(mean_ci([r[3] for r in mine]))])
        r = pearson([math.log(x[2]) for x in rows], [x[3] for x in rows])
        fig = self.figs / f"part{p}-{stream}-eta.png"
        plots.eta_scatter(rows, fig, f"part {p}: forgetting vs R_eta ({stream})")
        same_lr = [x for x in rows if METHODS[x[0]].lr_scale == 1]
        r_same = pearson([math.log(x[2]) for x in same_lr], [x[3] for x in same_lr])
        corr = ("too few cells for a correlation" if r is None else
                f"Pearson r between log R_eta and forgetting over {len(rows)} cells: {r:.3f}. "
                "Methods with an lr factor scale the step along every direction, not only the old "
                "ones, so part of this correlation is the overall step size. Over the cells at the "
                "grid's lr only (routing alone differs): "
                + ("too few cells" if r_same is None else f"r = {r_same:.3f} over {len(same_lr)} cells"))
        return (head + _table(["method", "cells", "R_eta", "forgetting (nats)"], table)
                + f"\n\n{corr}.\n\n![part {p} forgetting vs R_eta](reproduction/{fig.name})\n")

    def part7(self) -> str:
        rows = [[c.claim, c.paper, c.measured, c.verdict] for c in self.claims]
        return "\n".join([self._title(7), "Verdict rules: " + C.__doc__.split("\n\n")[1].replace("\n", " "),
                          "", _table(["claim", "paper v1", "measured here", "verdict"], rows), ""])

    def render(self) -> str:
        lm_pairs = [("vanilla", "ogp"), ("adam-nscl", "ogp-fixed"), ("ewc-shared", "ewc-decoupled"),
                    ("replay-shared", "replay-decoupled"), ("adam-nscl", "adam-nscl-both"),
                    ("ogp", "ogp-both"), ("adam-nscl-both", "ogp-both")]
        return "\n".join([
            self.header(), self.part1(), self.stream_part(2, lm_pairs), self.longer_section(),
            self.stream_part(3, [("vanilla", "ogp"), ("adam-nscl", "ogp-fixed")]), self.part3_overlap(),
            self.stream_part(4, [("vanilla", "ogp")]), self.stream_part(5, [("vanilla", "ogp")]),
            self.part6(), self.part7(),
        ])


def write_report(cache: str | Path, settings: Settings, docs: str | Path = "docs") -> Path:
    """Write ``<docs>/reproduction.md`` and ``<docs>/reproduction/*.png``; return the markdown path."""
    from lora_cl.reproduce.regime import REGIMES, regime_cache, regime_settings
    from lora_cl.reproduce.regime_doc import write_page

    for regime in REGIMES:  # the regime pages the main page opens with
        write_page(regime_cache(Path(cache)), regime_settings(regime, quick=settings.quick), Path(docs),
                   regime)
    report = Report(Path(cache), settings, Path(docs))
    path = Path(docs) / "reproduction.md"
    atomic_write_text(path, report.render())
    return path


def _overlap_verdict(per_cell: dict[str, dict[tuple[str, int], list[float]]]) -> str:
    """Is the stream built for high overlap measurably higher than the natural one? Compared on
    per-cell mean overlaps (logged values within a run are correlated; cells are not), paired by
    method and seed: the basis sets the level (gpm's activation bases read higher than gradient
    bases), so pooling cells of different methods would compare the method mix, not the streams."""
    natural, built = OVERLAP_STREAMS
    means = {stream: {key: sum(xs) / len(xs) for key, xs in runs.items()}
             for stream, runs in per_cell.items()}
    nat, high = (mean_ci(list(means[stream].values())) for stream in OVERLAP_STREAMS)

    def cells(n: int) -> str:
        return f"{n} cell{'' if n == 1 else 's'}"

    words = (f"Per-cell mean overlap, mean [95% CI] over cells: {natural} {_ci(nat)} ({cells(nat.n)}), "
             f"{built} {_ci(high)} ({cells(high.n)}). ")
    pr = paired(means[built], means[natural])
    if pr.ci.n < 2:
        return words + ("Whether the stream built for high overlap has it needs >= 2 projection "
                        "cells of the same method and seed on both streams.")
    words += (f"The basis sets the level (gpm's activation bases read higher than gradient bases), so "
              f"the streams are compared on cells of the same method and seed: {built} - {natural} = "
              f"{_ci(pr.ci)} over {pr.ci.n} pairs (p = {pr.p_value:.3g}). ")
    if pr.ci.lo > 0:
        return words + "The stream built for high overlap has measurably higher overlap."
    if pr.ci.hi < 0:
        return words + ("The stream built for high overlap has measurably *lower* overlap than the "
                        "natural stream: part 3 does not test a higher-overlap regime.")
    return words + ("The stream built for high overlap is not measurably higher in overlap than the "
                    "natural stream, so part 3 does not test a higher-overlap regime.")


def _against_lower_lr(controls: list[tuple[str, Any, str, str]]) -> str:
    """The effective-lr controls ((regime, page, lr cut, decoupled) each) in one generated
    sentence: decoupled routing against shared routing at a lower lr, each in % of vanilla's
    forgetting with its Holm verdict, and whether any of them shows decoupling doing better than
    the smaller step."""
    from lora_cl.reproduce.regime import lr_variant

    found = []
    for r, page, cut, dec in controls:
        c = page.claim(dec, cut)
        if c is None or c.pct.mean is None or c.nats.ci.n < 2:
            continue
        shared, scale = lr_variant(cut)
        found.append((c, f"{c.pct.mean:+.1f}% against {shared} at {scale:g}x the lr in ({r})"
                      + ("" if c.holds else " (not significant)")))
    if not found:
        return ""
    better = sum(c.holds and c.pct.mean < 0 for c, _ in found)
    verdict = (f"decoupling forgets less than the lower-lr shared run in {better} of {len(found)}" if better
               else "none shows decoupling forgetting less than shared routing at the lower lr")
    return (" Directly against shared routing at a lower lr (decoupled - shared, % of vanilla's "
            "forgetting, Holm-corrected): " + "; ".join(t for _, t in found) + f": {verdict}.")


def _plain_answer(pages: dict[str, Any]) -> str:
    """One generated sentence: in how many projection pairs decoupled routing forgets less than
    shared (Holm-corrected), by how much, and the paper's method against vanilla beside its claim."""
    from lora_cl.reproduce.regime import PROJECTION_PAIRS, lr_variant
    from lora_cl.reproduce.regime_doc import PAPER_REDUCTION_PCT

    tested = [(r, c) for r, page in pages.items() for _, sh, dec in PROJECTION_PAIRS
              if (c := page.claim(dec, sh)) is not None and c.nats.ci.n >= 2]
    if not tested:
        return "**No answer yet**: no projection pair has two finished seeds in either regime."
    less = [c for _, c in tested if c.holds and c.nats.ci.mean < 0]
    more = [c for _, c in tested if c.holds and c.nats.ci.mean > 0]
    sizes = sorted(c.pct.mean for c in less)
    size = (f", by {-sizes[-1]:.1f}% to {-sizes[0]:.1f}% of vanilla's forgetting" if len(sizes) > 1
            else f", by {-sizes[0]:.1f}% of vanilla's forgetting" if sizes else "")
    paper = []
    for r, page in pages.items():
        c = page.claim("overlap-decoupled", "vanilla")
        if c is not None and c.pct.mean is not None:
            paper.append(f"{c.pct.mean:.1f}% in ({r}){'' if c.holds else ' (not significant)'}")
    controls = [(r, page, cut, dec, fr) for r, page in pages.items()
                for _, cut, dec, fr in page.control_frontiers()]
    lines = [f"{fr.side} it in ({r}; shared at 1x and {lr_variant(cut)[1]:g}x the lr)"
             for r, _, cut, _, fr in controls if fr.side is not None]
    step = (" Is it more than a smaller step? Against the line through shared routing at two lrs "
            "(descriptive), decoupled routing lies " + ", ".join(lines) + "." if lines else "")
    step += _against_lower_lr([(r, page, cut, dec) for r, page, cut, dec, _ in controls])
    where = f"regime{'s' if len(pages) > 1 else ''} {' and '.join(f'({r})' for r in pages)}"
    rest = ("; the rest show no difference that survives the correction."
            if len(less) + len(more) < len(tested) else ".")
    vs_paper = (" The paper's method against vanilla AdamW: " + ", ".join(paper)
                + f", where the paper claims {PAPER_REDUCTION_PCT:.0f}%." if paper else "")
    return (f"**In plain words:** with the same bases, strength and lr, decoupled routing forgets less "
            f"than shared routing in {len(less)} of the {len(tested)} projection pairs tested in "
            f"{where}{size}" + (f", and more in {len(more)}" if more else "") + rest + vs_paper + step)
