"""``docs/reproduction/regime-a.md``: the time-scale-matched grid, generated from its cell cache.

Every figure on the page is computed here from the cells' ``summary.json`` and
``domains/*/metrics.json``; nothing is typed in. Verdicts are paired over seeds (the same seed
draws the same training order and held-out examples for every method), Holm-corrected over the
page's claims, and given as effect sizes in % of vanilla's forgetting beside the paper's figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cl.paths import atomic_write_text
from lora_cl.reproduce.collect import CellResult, forgetting_nats, load_cells, summary_value
from lora_cl.reproduce.doc import _table
from lora_cl.reproduce.grid import Settings
from lora_cl.reproduce.regime import (
    CONTROLS,
    EMA_BETA,
    FIXED_SHARED_LR_SCALE,
    HARD_SHARED_LR_SCALE,
    LR_CHECK_REGIME,
    LR_SCALES,
    MATCHED_LR_SCALE,
    MIN_HORIZONS,
    PAIRS,
    REGIME_CACHE,
    REGIME_STREAM,
    horizons,
    lr_variant,
    regime_cells,
    regime_methods,
)
from lora_cl.reproduce.stats import MeanCI, Paired, holm, mean_ci, paired


def page_path(regime: str) -> Path:
    """The page of a regime, relative to the docs folder."""
    return Path("reproduction") / f"regime-{regime}.md"


#: What each regime trains, for the page.
_MODEL_TEXT = {
    "a": ("`{model}` (a 4-layer, d = 256 Llama with its own 8,192-token byte-level BPE tokenizer trained "
          "on the stream's training slices) is trained in full from the same random initialisation on "
          "`{stream}` ({domains}); every linear weight is routed (`model.finetune: full`), norms stay "
          "vanilla AdamW. Bases: input-side gradient rows of each domain's last steps, rank <= 32 per "
          "domain, accumulated."),
    "b": ("`{model}` with a LoRA adapter (r = {r} on {targets}) is trained on `{stream}` ({domains}); "
          "both LoRA factors are routed and protected (lora_A on its input side, lora_B on its output "
          "side, the presets' default). Bases: gradient rows of each domain's last steps, rank <= 32 per "
          "domain, accumulated; general ability is scored on `{general}`, which no domain trains on."),
}
_TITLE = {"a": "Regime (a): the paper's setting scaled down, where Adam's second moment can undo a modifier",
          "b": "Regime (b): SmolLM2-135M + LoRA with Adam's horizon scaled to the stream"}
#: The paper's central claim: its method forgets 29% less than vanilla AdamW (PAPER.md).
PAPER_REDUCTION_PCT = -29.0
#: The paper's own second-moment decay and the steps per domain it needs for MIN_HORIZONS horizons
#: (issue 25's paper-length variant of regime (a)).
PAPER_BETA2 = 0.999
PAPER_STEPS = 5000
LEVEL = 0.05


@dataclass
class DomainMech:
    """One domain of one cell: what the optimizer logged while training it."""

    v_share: float | None      # share of v's mass from this domain's gradients at its end
    alpha: float | None        # mean logged projection strength
    overlap: float | None      # mean logged overlap s_t of the gradient with the old bases
    eta_old: float | None      # mean logged old-direction effective learning rate (probe, input side)
    leak: float | None         # ||P dW|| / ||dW|| of the domain's update in the earlier bases
    epoch: float | None        # passes over the domain's training slice
    eta_old_out: float | None = None  # the same probe on the output side (lora_B, regime b)
    v_energy: float | None = None  # E_U(v), v's energy along the protected directions (input side)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else None


def _leak(entry: Any) -> float | None:
    if not isinstance(entry, dict):
        return None
    vals = [v for v in entry.values() if v is not None]
    return _mean(vals)


#: Horizons of beta2 into a domain after which its v is read: 1 - e^-3, 95% of v's mass is the domain's.
SETTLED_HORIZONS = 3


def settled_step(settings: Settings) -> int:
    """The first step of a domain at which Adam's v mostly reflects it (SETTLED_HORIZONS horizons)."""
    return math.ceil(SETTLED_HORIZONS / (1 - settings.adam_beta2))


def domain_mechanism(run_dir: Path, settled: int = 0) -> list[DomainMech]:
    """Per domain (in order) the mechanism values logged in ``domains/*/metrics.json``; the probes of
    Adam's v (eta_U) only from step ``settled`` of the domain on, where v reflects the domain."""
    out = []
    for mpath in sorted((run_dir / "domains").glob("*/metrics.json")):
        m = json.loads(mpath.read_text(encoding="utf-8"))
        h = m.get("log_history", [])

        def values(key: str, history: list[dict[str, Any]] = h) -> list[float]:
            return [float(x[key]) for x in history if key in x]

        def probe(key: str, history: list[dict[str, Any]] = h) -> float | None:
            """Mean of a probe from step ``settled`` on, one value per step (the end-of-training
            log repeats the last step's)."""
            return _mean(list({x.get("step"): float(x[key]) for x in history
                               if key in x and x.get("step", settled) >= settled}.values()))

        share = values("cl/v_current_share")
        epochs = values("epoch")
        out.append(DomainMech(share[-1] if share else None, _mean(values("projection/alpha")),
                              _mean(values("projection/overlap")),
                              probe("probe/old_direction_lr"),
                              _leak(m.get("protection_leak")), epochs[-1] if epochs else None,
                              probe("probe/old_direction_lr_out"), probe("probe/v_energy_old")))
    return out


def _ci(s: MeanCI | None, d: int = 3) -> str:
    if s is None or s.mean is None:
        return "—"
    if s.lo is None:
        return f"{s.mean:.{d}f} (n = 1)"
    return f"{s.mean:.{d}f} [{s.lo:.{d}f}, {s.hi:.{d}f}]"


@dataclass
class Frontier:
    """Decoupled routing against the line through shared routing's two lrs (RegimePage.frontier)."""

    seeds: int                # seeds with all three cells
    d_forgetting: MeanCI      # the lr cut's forgetting - shared's
    d_just_trained: MeanCI    # the lr cut's just-trained loss - shared's
    gap: Paired               # decoupled's forgetting - the line's at its just-trained loss
    pct: MeanCI               # the gap as % of vanilla's forgetting
    outside: int              # seeds where the decoupled run's J lies outside shared's two
    no_trade: int             # seeds where the cut is no trade-off (no line)

    @property
    def side(self) -> str | None:
        """Where decoupled routing lies against the line: "beyond" (its gap's interval below 0),
        "inside" (above 0) or "on"; None with fewer than two seeds judged."""
        gap = self.gap.ci
        if not gap.n or gap.lo is None or gap.hi is None:
            return None
        return "beyond" if gap.hi < 0 else "inside" if gap.lo > 0 else "on"


@dataclass
class Claim:
    """One comparison of the page: a - b per seed, as nats and as % of vanilla's forgetting."""

    name: str
    a: str
    b: str
    nats: Paired
    pct: MeanCI
    p_holm: float | None = None

    @property
    def holds(self) -> bool:
        return self.p_holm is not None and self.p_holm < LEVEL and self.nats.ci.excludes_zero()

    @property
    def tested(self) -> bool:
        """Whether the claim has a p-value (two seeds or more; one seed has no interval, no test)."""
        return self.nats.p_value is not None

    @property
    def verdict(self) -> str:
        """"untested" (one seed), "holds", "not after Holm" (the interval alone excludes 0, the
        family-wise test does not) or "no difference"."""
        if not self.tested:
            return "untested"
        if self.holds:
            return "holds"
        return "not after Holm" if self.nats.ci.excludes_zero() else "no difference"


class RegimePage:
    """The page's numbers, read once from the cache."""

    def __init__(self, cache: Path, settings: Settings, docs: Path, regime: str = "a") -> None:
        self.cache, self.settings, self.docs, self.regime = cache, settings, docs, regime
        self.table = regime_methods(regime)
        self.cells = regime_cells(settings, regime=regime)
        self.results = load_cells(self.cells, cache)
        self.by = {(r.cell.method.label, r.cell.seed): r for r in self.results}
        self.settled = settled_step(settings)
        self.mech = {key: domain_mechanism(r.cell.run_dir(cache), self.settled) for key, r in self.by.items()}
        self.forget = {key: forgetting_nats(r.summary) for key, r in self.by.items()}
        self.claims = self._claims()

    # -- values --------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return [m for m in self.table if any(k[0] == m for k in self.by)]

    def per_seed(self, method: str, value: Any) -> dict[int, float]:
        out = {}
        for (m, seed), r in self.by.items():
            v = value(r) if m == method else None
            if v is not None and math.isfinite(v):
                out[seed] = float(v)
        return out

    def forgetting(self, method: str) -> dict[int, float]:
        return self.per_seed(method, lambda r: forgetting_nats(r.summary))

    def final_loss(self, method: str) -> dict[int, float]:
        """Mean held-out loss over all domains after the last one, per seed."""
        return self.per_seed(method, lambda r: summary_value(r.summary, "loss", "op"))

    def just_trained_loss(self, method: str) -> dict[int, float]:
        """Mean over domains of the held-out loss right after training that domain (plasticity)."""
        return self.per_seed(method,
                             lambda r: _mean((r.summary["metrics"]["loss"] or {}).get("diagonal") or []))

    def pct_of_vanilla(self, a: str, b: str | None, vanilla: str = "vanilla") -> MeanCI:
        """100 (F_a - F_b) / F_vanilla per seed (b None: F_b = F_vanilla); ``vanilla`` names the
        run whose forgetting is the unit (the lr check: vanilla at the same lr)."""
        van, fa = self.forgetting(vanilla), self.forgetting(a)
        fb = van if b is None else self.forgetting(b)
        seeds = sorted(set(van) & set(fa) & set(fb))
        return mean_ci([100 * (fa[s] - fb[s]) / van[s] for s in seeds if van[s] > 0])

    def _claims(self) -> list[Claim]:
        claims = []
        for name, shared, decoupled in (*PAIRS, *CONTROLS):
            if self.forgetting(shared) and self.forgetting(decoupled):
                pair = (name, shared, decoupled) in PAIRS
                what = "decoupled - shared" if pair else f"{decoupled} - {shared}"
                claims.append(Claim(f"{name}: {what}", decoupled, shared,
                                    paired(self.forgetting(decoupled), self.forgetting(shared)),
                                    self.pct_of_vanilla(decoupled, shared)))
        for m in self.methods():
            if m != "vanilla" and lr_variant(m) is None and self.forgetting("vanilla"):
                claims.append(Claim(f"{m} - vanilla", m, "vanilla",
                                    paired(self.forgetting(m), self.forgetting("vanilla")),
                                    self.pct_of_vanilla(m, None)))
        for c, p in zip(claims, holm([c.nats.p_value for c in claims]), strict=True):
            c.p_holm = p
        return claims

    def mech_stat(self, method: str, attr: str, domains: slice = slice(1, None)) -> MeanCI:
        """A mechanism value: per cell the mean over ``domains`` (default 2..T), then over seeds."""
        vals = []
        for (m, _), doms in self.mech.items():
            if m == method:
                v = _mean([getattr(d, attr) for d in doms[domains]])
                if v is not None:
                    vals.append(v)
        return mean_ci(vals)

    def mech_ratio(self, a: str, b: str, attr: str = "eta_old") -> MeanCI:
        """A DomainMech value of method ``a`` over ``b``'s, per seed and later domain. eta_U,
        shared / decoupled (``attr`` "eta_old", or "eta_old_out" on the output side): Proposition
        1's 1/(1 - alpha); v's energy along the bases, decoupled / shared ("v_energy"): its R_v."""
        ratios = []
        for (m, seed), doms in self.mech.items():
            other = self.mech.get((b, seed))
            if m != a or other is None:
                continue
            for da, db in zip(doms[1:], other[1:], strict=False):
                x, y = getattr(da, attr), getattr(db, attr)
                if x and y:
                    ratios.append(x / y)
        return mean_ci(ratios)

    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    # -- page ----------------------------------------------------------------------------
    def answer(self) -> str:
        """The opening paragraph: the routing verdicts in plain words."""
        s = self.settings
        n_done, n_all = len(self.results), len(self.cells)
        pairs = {(a, b) for _, a, b in (*PAIRS, *CONTROLS)}
        routing = [c for c in self.claims if (c.b, c.a) in pairs]
        if not routing:
            return (f"**No answer yet**: {n_done} of {n_all} cells are finished and no routing pair "
                    "(shared and decoupled of the same strength) has a finished seed.")
        lines = []
        for c in routing:
            n = c.nats.ci.n
            what = c.name.split(":")[0]
            other = "shared" if c.name.endswith("decoupled - shared") else c.b
            lower = sum(d < 0 for d in c.nats.diffs)
            size = (f"{_ci(c.nats.ci)} nats of forgetting, {_ci(c.pct, 1)}% of vanilla's forgetting "
                    f"({n} seed{'s' if n != 1 else ''}, decoupled lower on {lower} of {n}; Holm-adjusted "
                    f"p = {'—' if c.p_holm is None else f'{c.p_holm:.3g}'})")
            shared_label, decoupled_label = c.b, c.a
            ratio = self.mech_ratio(shared_label, decoupled_label)
            alpha = self.mech_stat(decoupled_label, "alpha")
            if ratio.mean is not None and alpha.mean is not None:
                bound = f"{1 / (1 - alpha.mean):.2f}" if alpha.mean < 1 else "unbounded at alpha 1"
                who = "shared routing" if other == "shared" else other
                out_side = self.mech_ratio(shared_label, decoupled_label, "eta_old_out")
                sides = "" if out_side.mean is None else (
                    f" on the input side (lora_A) and {_ci(out_side, 2)}x on the output side (lora_B)")
                size += (f"; {who}'s old-direction learning rate was {_ci(ratio, 2)}x the "
                         f"decoupled run's{sides} (1/(1 - alpha) = {bound})")
            size += self._plasticity(decoupled_label, shared_label, other)
            direction = ("less" if c.nats.ci.mean < 0 else "more") if c.tested else ""
            if c.verdict == "untested":  # no interval, no test: said so, not "no difference"
                lines.append(f"- **{what}: one seed so far, not tested** (decoupled against {other}) "
                             f"— {size}.")
            elif c.verdict == "holds":
                lines.append(f"- **{what}: decoupled routing forgets {direction} than {other}** — {size}.")
            elif c.verdict == "not after Holm":
                lines.append(f"- **{what}: decoupled routing forgets {direction} than {other}, but not "
                             f"significantly once Holm corrects for the page's {self.tested()} tested "
                             f"claims** — {size}.")
            else:
                lines.append(f"- **{what}: no difference detectable** between decoupled routing and "
                             f"{other} — {size}.")
        h = horizons(s, self.regime)
        training = (f"full-parameter training of {s.model} from scratch" if self.regime == "a"
                    else f"a LoRA adapter on the pretrained {s.model}")
        return (f"In this regime (every domain {s.steps} steps = {h['beta2']:.1f} horizons of "
                f"beta2 = {s.adam_beta2} and {h['overlap_ema']:.1f} of the overlap EMA; {training}; "
                f"{n_done} of {n_all} cells finished), decoupled "
                "against shared routing, same bases, same strength, paired by seed (negative: "
                "decoupled forgets less); an effective-lr control pits decoupled routing against "
                "shared routing at a lower lr instead:\n\n" + "\n".join(lines))

    def tested(self) -> int:
        """How many of the page's claims have a p-value: the size of its Holm family."""
        return sum(c.tested for c in self.claims)

    def claim(self, a: str, b: str) -> Claim | None:
        """The page's claim a - b, if both have a finished seed."""
        return next((c for c in self.claims if c.a == a and c.b == b), None)

    def _short_claim(self, c: Claim | None, label: str) -> str:
        """One claim as 'label -4.3 [-6.1, -2.5]% (holds)': % of vanilla's forgetting and its verdict."""
        if c is None or not c.pct.n:
            return f"{label}: not run"
        n, want = c.nats.ci.n, len(self.settings.seeds)
        seeds = "" if n >= want else f", {n} of {want} seeds"
        verdict = {"untested": "one seed, not tested", "no difference": "no difference detectable"}.get(
            c.verdict, c.verdict)
        return f"{label} {_ci(c.pct, 1)}% ({verdict}{seeds})"

    def in_short(self) -> dict[str, str]:
        """This regime's column of the reproduction page's summary table: question -> answer, each
        figure a % of vanilla's forgetting with its 95% CI (negative: the first run forgets less)."""
        out: dict[str, str] = {
            "cells": f"{len(self.results)} of {len(self.cells)} finished, {len(self.settings.seeds)} "
                     f"seeds per method planned"}
        short = {"fixed-shared": "fixed", "overlap-shared": "overlap-adaptive", "hard-shared": "hard",
                 "ewc-shared": "EWC", "replay-shared": "replay"}
        out["decoupled - shared (same bases, strength, lr)"] = "; ".join(
            self._short_claim(self.claim(dec, sh), short.get(sh, sh)) for _, sh, dec in PAIRS)
        ratio = self.mech_ratio("fixed-shared", "fixed-decoupled")
        out_side = self.mech_ratio("fixed-shared", "fixed-decoupled", "eta_old_out")
        alpha = self.mech_stat("fixed-decoupled", "alpha")
        if ratio.mean is not None and alpha.mean is not None and alpha.mean < 1:
            sides = "" if out_side.mean is None else f" (lora_A), {out_side.mean:.2f}x (lora_B)"
            out["old-direction lr, shared / decoupled, fixed alpha"] = (
                f"{ratio.mean:.2f}x{sides}; Proposition 1: {1 / (1 - alpha.mean):.2f}x")
        lr_cut = []
        for _, cut, dec, fr in self.control_frontiers():
            c = self.claim(dec, cut)
            if c is None:
                continue
            text = self._short_claim(c, f"{dec} - {cut}")
            if fr.side is not None:
                scale = lr_variant(cut)[1]
                text += (f"; against the line through shared's lr and {scale:g}x: {_ci(fr.pct, 1)}% "
                         f"({fr.side} the line)")
            lr_cut.append(text)
        if lr_cut:
            out["more than a smaller step? (decoupled against shared at a lower lr)"] = "; ".join(lr_cut)
        out[f"the paper's method (overlap-decoupled) - vanilla; paper: {PAPER_REDUCTION_PCT:.0f}%"] = (
            self._short_claim(self.claim("overlap-decoupled", "vanilla"), "overlap-decoupled"))
        return out

    def _plasticity(self, a: str, b: str, other: str) -> str:
        """The same pair's stability-plasticity cost: paired differences of just-trained and final
        loss, a - b in nats (positive: a learned the new domains less well, or ends worse overall)."""
        parts = []
        for what, value in (("just-trained loss", self.just_trained_loss), ("final loss", self.final_loss)):
            va, vb = value(a), value(b)
            if set(va) & set(vb):
                parts.append(f"{what} {_ci(paired(va, vb).ci)}")
        return f"; {' and '.join(parts)} nats, decoupled - {other}" if parts else ""

    def render(self) -> str:
        s = self.settings
        h = horizons(s, self.regime)
        in_regime = h["beta2"] >= MIN_HORIZONS and h["overlap_ema"] >= MIN_HORIZONS
        model = _MODEL_TEXT[self.regime].format(
            model=s.model, stream=REGIME_STREAM, domains=", ".join(self._domains()), r=s.lora_r,
            targets=", ".join(s.targets), general=s.general)
        out = [f"# {_TITLE[self.regime]}", "",
               f"<!-- generated by `lora-cl reproduce --regime {self.regime} --report`; do not edit -->", "",
               self.answer(), "",
               "## The regime",
               f"{model} {s.steps} steps of {s.batch_size} x {s.seq_len} tokens per domain, lr {s.lr:g} "
               f"(constant), beta2 = {s.adam_beta2}, overlap EMA beta = {EMA_BETA[self.regime]}, "
               f"{len(s.seeds)} seeds (the seed draws the training order and the {s.eval_examples} "
               "held-out blocks per domain)." + self._paper_length(), "",
               _table(["check", "value", "rule"], [
                   ["steps x (1 - beta2)", f"{h['beta2']:.1f}", f">= {MIN_HORIZONS}"],
                   ["steps x (1 - beta) of the overlap EMA", f"{h['overlap_ema']:.1f}", f">= {MIN_HORIZONS}"],
                   ["passes over each domain's training slice (measured)", self._passes(), "<= ~2"],
                   ["share of v from the current domain at its end (measured, domains 2..T)",
                    _ci(self.mech_stat("vanilla", "v_share")), "near 1 in regime"],
                   ["in regime", "yes" if in_regime else "**no**", ""]]), "",
               "## Forgetting, routing by routing", self._claims_table(), "",
               "## Stability and plasticity", self._outcome_table(), "",
               f"![stability-plasticity](regime-{self.regime}-tradeoff.png)", "",
               "## Mechanism beside outcome", self._mechanism(), "",
               f"![forgetting vs leak](regime-{self.regime}-leak.png)", "",
               "## The adaptive rule over domains", self._alpha_table(), "",
               "## The learning rate", self._lr_table(), "",
               "## Compute and commands", self._compute(), ""]
        return "\n".join(out)

    def _domains(self) -> list[str]:
        from lora_cl.reproduce.grid import stream_sources

        sources = stream_sources(REGIME_STREAM, self.settings)
        return [d["source"].partition(":")[2] or d.get("name", "") for d in sources]

    def _paper_length(self) -> str:
        """Regime (a): why the paper's own beta2 at as many horizons is not on the page, sized by
        this page's own cells (their passes per domain and their cell time, scaled by the steps)."""
        if self.regime != "a":
            return ""
        s = self.settings
        scale = PAPER_STEPS / s.steps
        epochs = self._epochs()
        n = len(self.results)
        sized = []
        if n:
            hours = round(self.seconds() / n * scale / 3600)
            sized.append(f"about {hours} hour{'' if hours == 1 else 's'} per cell on 2 cores at "
                         "this page's mean cell time (wall clock: an upper bound)")
        if epochs:
            sized.append(f"{max(epochs) * scale:.0f} passes over each domain's training slice of "
                         f"`{REGIME_STREAM}` (the rule allows ~2)")
        cost = f": {' and '.join(sized)}" if sized else ""
        return (f" Not run: the paper's own beta2 = {PAPER_BETA2} at the same {MIN_HORIZONS} horizons, "
                f"{PAPER_STEPS:,} steps per domain, {scale:.0f}x this regime's{cost}; that variant waits "
                "for a GPU and a larger stream.")

    def _epochs(self) -> list[float]:
        """Passes over its training slice that each finished domain of each cell made."""
        return [d.epoch for doms in self.mech.values() for d in doms if d.epoch is not None]

    def _passes(self) -> str:
        epochs = self._epochs()
        return f"{min(epochs):.2f} - {max(epochs):.2f}" if epochs else "—"

    def _claims_table(self) -> str:
        if not self.claims:
            return "No finished cells yet."
        rows = []
        for c in self.claims:
            paper = f"{PAPER_REDUCTION_PCT:.0f}%" if c.a == "overlap-decoupled" and c.b == "vanilla" else ""
            rows.append([c.name, str(c.nats.ci.n), _ci(c.nats.ci, 4), _ci(c.pct, 1), paper,
                         "—" if c.nats.p_value is None else f"{c.nats.p_value:.3g}",
                         "—" if c.p_holm is None else f"{c.p_holm:.3g}",
                         {"holds": "**holds**", "untested": "not tested (one seed)"}.get(
                             c.verdict, "not shown")])
        return ("Each row is a paired difference of forgetting (nats; mean held-out loss rise on earlier "
                "domains, TRACE-style max-minus-final), a - b over the seeds both finished, with its "
                "95% t-interval, the same as % of vanilla's forgetting on that seed, the paired t-test "
                f"p-value and its Holm adjustment over the {self.tested()} claims of this page that "
                "have a p-value (a claim on one seed has none and is not counted). A "
                f"claim holds when the adjusted p < {LEVEL} and the interval excludes 0.\n\n"
                + _table(["claim (a - b)", "seeds", "nats [95% CI]", "% of vanilla [95% CI]",
                          "paper", "p", "p (Holm)", "verdict"], rows))

    def _outcome_table(self) -> str:
        rows = []
        for m in self.methods():
            cells = [r for (label, _), r in self.by.items() if label == m]
            rows.append([m, str(len(cells)), _ci(mean_ci(list(self.forgetting(m).values())), 4),
                         _ci(mean_ci(list(self.final_loss(m).values()))),
                         _ci(mean_ci(list(self.just_trained_loss(m).values()))),
                         _ci(self.mech_stat(m, "leak"))])
        self._tradeoff_plot()
        return (self._replay_line()
                + "Forgetting alone can be bought with plasticity, so they stand together: final loss is "
                "the mean held-out loss over all domains after the last one; just-trained loss is the "
                "mean over domains of the loss right after training that domain (plasticity); leak is "
                "the share of each later domain's update inside the earlier domains' protected "
                "subspace, ||P dW|| / ||dW||.\n\n"
                + _table(["method", "seeds", "forgetting (nats)", "final loss", "just-trained loss",
                          "leak (domains 2..T)"], rows))

    def _replay_line(self) -> str:
        """The replay buffer's size (examples, tokens) and whether replay beats vanilla here."""
        replay = [m for m in self.methods() if self.table[m].preset == "replay"]
        if not replay:
            return ""
        sizes = []
        for (m, _), r in self.by.items():
            if m in replay:
                doms = sorted((r.cell.run_dir(self.cache) / "domains").glob("*/metrics.json"))
                last = json.loads(doms[-1].read_text(encoding="utf-8")).get("log_history", []) if doms else []
                n = [int(h["cl/replay_examples"]) for h in last if "cl/replay_examples" in h]
                if n:
                    sizes.append(n[-1])
        van = mean_ci(list(self.forgetting("vanilla").values()))
        words = []
        for m in replay:
            f = mean_ci(list(self.forgetting(m).values()))
            if f.mean is not None and van.mean is not None:
                words.append(f"{m} forgets {f.mean:.4f} nats against vanilla's {van.mean:.4f} "
                             f"({'beats' if f.mean < van.mean else 'does not beat'} vanilla on this stream)")
        size = (f"{max(sizes)} examples ({max(sizes) * self.settings.seq_len:,} tokens) in the buffer by the "
                "last domain" if sizes else "buffer size not logged")
        return (f"Replay: {self.table[replay[0]].overrides.get('replay_fraction', 0):.0%} of each domain's "
                f"training blocks kept, {size}; " + "; ".join(words) + ".\n\n")

    def _mechanism(self) -> str:
        rows = []
        for m in self.methods():
            rows.append([m, _ci(self.mech_stat(m, "v_share")), _ci(self.mech_stat(m, "alpha")),
                         _ci(self.mech_stat(m, "overlap")), _ci(self.mech_stat(m, "eta_old"), 6),
                         _ci(self.mech_stat(m, "leak"))])
        ratio_rows = []
        out_side = any(d.eta_old_out for doms in self.mech.values() for d in doms)
        energy = any(d.v_energy for doms in self.mech.values() for d in doms)
        for name, shared, decoupled in PAIRS:
            r = self.mech_ratio(shared, decoupled)
            alpha = self.mech_stat(decoupled, "alpha")
            if r.mean is None or alpha.mean is None:
                continue
            ratio_rows.append([name, _ci(r)] + ([_ci(self.mech_ratio(shared, decoupled, "eta_old_out"))]
                                                if out_side else [])
                              + [f"{1 / (1 - alpha.mean):.2f}" if alpha.mean < 1 else "unbounded"]
                              + ([_ci(self.mech_ratio(decoupled, shared, "v_energy")),
                                  f"{1 / (1 - alpha.mean) ** 2:.2f}" if alpha.mean < 1 else "unbounded"]
                                 if energy else [])
                              + [_ci(self.mech_stat(shared, "leak")), _ci(self.mech_stat(decoupled, "leak"))])
        self._leak_plot()
        text = ("Per method, the mean over domains 2..T (then over seeds) of what the optimizer logged: "
                "the share of Adam's v (its mass) from the current domain at the domain's end, the "
                "projection strength alpha, the overlap s_t of the gradient with the old bases, the "
                "old-direction effective learning rate eta_U = lr / sqrt(v-hat) along the protected "
                f"directions (the callback's probe, read from step {self.settled} of each domain on, "
                f"{SETTLED_HORIZONS} horizons of beta2 = {self.settings.adam_beta2} in, where 95% of v's "
                "mass is the domain's own) and the leak.\n\n"
                + _table(["method", "v share, current domain", "alpha", "overlap s", "eta_U (old dirs)",
                          "leak"], rows))
        if ratio_rows:
            text += ("\n\nProposition 1's inflation, measured: eta_U of the shared run over eta_U of the "
                     "decoupled run at the same seed and domain (the paper predicts 1/(1 - alpha) for "
                     "coordinate-aligned bases; rotated bases give less), beside the leak it produced.\n\n"
                     + ("The output side (lora_B's bases) is probed by the cells that logged it; the "
                        "input side (lora_A's, or every weight's in regime (a)) by all.\n\n"
                        if out_side else "")
                     + ("R_v is Proposition 1's other ratio: v's energy along the protected directions, "
                        "decoupled over shared (predicted 1/(1 - alpha)^2 for coordinate-aligned bases), "
                        "from the cells that logged it. eta_U averages lr / sqrt(v-hat) along the bases, "
                        "so coordinates with little v weigh most in it; R_v shows how much of v's energy "
                        "there shared routing took away.\n\n" if energy else "")
                     + _table(["pair", "eta_U shared / decoupled"]
                              + (["same, output side (lora_B)"] if out_side else [])
                              + ["1/(1 - alpha)"]
                              + (["R_v (input side): v energy on old dirs, decoupled / shared",
                                  "1/(1 - alpha)^2"] if energy else [])
                              + ["leak shared", "leak decoupled"], ratio_rows))
        return text

    def _alpha_table(self) -> str:
        adaptive = [m for m in self.methods() if self.table[m].preset in ("ogp", "ogp-debiased")]
        if not adaptive:
            return "No overlap-adaptive cell finished yet."
        T = max((len(d) for d in self.mech.values()), default=0)
        rows = []
        for m in adaptive:
            rows.append([m] + [_ci(self.mech_stat(m, "alpha", slice(i, i + 1))) for i in range(1, T)])
        return ("In accumulate mode the overlap is measured against the union of all earlier domains' "
                "bases, which only grows, so alpha = alpha_max (1 - s) can only fall as more domains "
                "need protecting. Mean logged alpha per domain:\n\n"
                + _table(["method"] + [f"domain {i + 1}" for i in range(1, T)], rows))

    def _lr_table(self) -> str:
        """Every method run at more than one lr, at each: does a verdict hang on the lr?"""
        bases = list(dict.fromkeys(v[0] for m in self.table if (v := lr_variant(m))))
        rows = []
        for base in bases:
            variants = [(1.0, base)] + [(v[1], m) for m in self.table
                                        if (v := lr_variant(m)) and v[0] == base]
            for scale, label in sorted(variants):
                rows.append([base, f"{self.settings.lr * scale:g}", str(len(self.forgetting(label))),
                             _ci(mean_ci(list(self.forgetting(label).values())), 4),
                             _ci(mean_ci(list(self.final_loss(label).values()))),
                             _ci(mean_ci(list(self.just_trained_loss(label).values())))])
        check = (f"Vanilla and overlap-decoupled at half and twice the regime's lr ({self.settings.lr:g}), "
                 "same seeds: whether the ranking of the two holds across a 4x range of lr; and the "
                 if self.regime == LR_CHECK_REGIME else
                 f"The lr check (vanilla and overlap-decoupled at half and twice the lr) runs in regime "
                 f"({LR_CHECK_REGIME}) only. Here, the ")
        return (check + f"effective-lr controls: hard-shared at {HARD_SHARED_LR_SCALE:g}x the lr (decoupled "
                "routing of a hard projection steps smaller in every direction) and fixed-shared at "
                f"{FIXED_SHARED_LR_SCALE:g}x (about the inverse of the old-direction inflation regime (a) "
                "measured, 1.27x, when the control was chosen; the same cut in every regime)"
                + (f", and in this regime fixed-shared at {MATCHED_LR_SCALE:g}x, the lr at which its "
                   "just-trained loss matches the decoupled run's (read off the line through shared's "
                   "first two lrs), so the two compare at equal plasticity without a line"
                   if f"fixed-shared@lr{MATCHED_LR_SCALE:g}x" in self.table else "")
                + ": does decoupling beat a plain lr cut on both forgetting and just-trained loss?\n\n"
                + _table(["method", "lr", "seeds", "forgetting (nats)", "final loss", "just-trained loss"],
                         rows) + self._ranking_table() + self._frontier_table())

    def lr_ranking(self, method: str = "overlap-decoupled") -> list[tuple[float, Paired, MeanCI, Paired]]:
        """At each lr of the lr check: ``method`` - vanilla at that lr, paired by seed, in forgetting
        (nats, and % of that lr's vanilla forgetting) and in final loss."""
        out = []
        for scale in sorted((1.0, *LR_SCALES)):
            tag = "" if scale == 1.0 else f"@lr{scale:g}x"
            van, meth = f"vanilla{tag}", f"{method}{tag}"
            out.append((self.settings.lr * scale, paired(self.forgetting(meth), self.forgetting(van)),
                        self.pct_of_vanilla(meth, van, vanilla=van),
                        paired(self.final_loss(meth), self.final_loss(van))))
        return out

    def _ranking_table(self, method: str = "overlap-decoupled") -> str:
        ranking = [r for r in self.lr_ranking(method) if r[1].ci.n]
        rows = [[f"{lr:g}", str(f.ci.n), _ci(f.ci, 4), _ci(pct, 1),
                 "—" if f.p_value is None else f"{f.p_value:.3g}", _ci(final.ci)]
                for lr, f, pct, final in ranking]
        if not rows:
            return ""
        # the row figures in one line, in lr order (a summary can quote the whole sequence)
        line = "" if len(ranking) < 2 else (f" In % of that lr's vanilla forgetting, at "
                f"{', '.join(f'{lr / self.settings.lr:g}x' for lr, *_ in ranking)} the lr: "
                f"{', '.join('—' if pct.mean is None else f'{pct.mean:.1f}' for _, _, pct, _ in ranking)}.")
        return (f"\n\nThe ranking at each lr: {method} - vanilla at the same lr, paired by seed "
                f"(negative: {method} forgets less; % of that lr's vanilla forgetting; p unadjusted, "
                "outside the Holm family)." + line + "\n\n"
                + _table(["lr", "seeds", "forgetting (nats)", "% of vanilla", "p", "final loss (nats)"],
                         rows))

    def frontier(self, shared: str, cut: str, decoupled: str) -> Frontier:
        """Decoupled routing against the stability-plasticity line of shared routing's two lrs.

        Per seed with all three cells: the lr cut moves shared routing by (dJ, dF) in just-trained
        loss J and forgetting F. Where it trades plasticity for stability (dJ > 0), the straight
        line through shared's two points gives the forgetting shared routing would have at the
        decoupled run's J; ``gap`` is the decoupled run's forgetting minus that (negative: beyond
        the line, less forgetting for the same plasticity), on the seeds where the decoupled run's
        J lies between shared's two (``outside`` counts the others: a line through two close
        points, extrapolated, says nothing). A seed where the cut is no trade (it costs no
        plasticity or buys no stability) has no line to beat: it counts in ``no_trade``.
        """
        f_s, f_c, f_d = self.forgetting(shared), self.forgetting(cut), self.forgetting(decoupled)
        j_s, j_c, j_d = (self.just_trained_loss(m) for m in (shared, cut, decoupled))
        van = self.forgetting("vanilla")
        seeds = sorted(set(f_s) & set(f_c) & set(f_d) & set(j_s) & set(j_c) & set(j_d))
        gaps, pcts, outside, no_trade = {}, [], 0, 0
        for k in seeds:
            dj, df = j_c[k] - j_s[k], f_c[k] - f_s[k]
            if dj <= 0 or df >= 0:
                no_trade += 1
                continue
            if not j_s[k] <= j_d[k] <= j_c[k]:  # (a line extrapolated from a short span explodes)
                outside += 1
                continue
            gaps[k] = f_d[k] - (f_s[k] + (j_d[k] - j_s[k]) * df / dj)
            if van.get(k, 0) > 0:
                pcts.append(100 * gaps[k] / van[k])
        def on_seeds(d: dict[int, float]) -> dict[int, float]:
            return {k: d[k] for k in seeds}

        return Frontier(len(seeds), paired(on_seeds(f_c), on_seeds(f_s)).ci,
                        paired(on_seeds(j_c), on_seeds(j_s)).ci, paired(gaps, dict.fromkeys(gaps, 0.0)),
                        mean_ci(pcts), outside, no_trade)

    def control_frontiers(self) -> list[tuple[str, str, str, Frontier]]:
        """(name, lr cut, decoupled, frontier) of each effective-lr control (CONTROLS), its line
        drawn through the shared run of the decoupled run's pair and the cut."""
        return [(name, cut, dec, self.frontier(next(sh for _, sh, d in PAIRS if d == dec), cut, dec))
                for name, cut, dec in CONTROLS]

    def _frontier_table(self) -> str:
        rows = []
        for name, cut, _, fr in self.control_frontiers():
            if not fr.seeds:
                continue
            gap = fr.gap.ci
            if not gap.n:
                reading = "no seed to judge"
            elif fr.side is None:
                reading = "one seed: no interval"
            else:
                reading = {"beyond": "**decoupled beyond the line** (less forgetting at equal plasticity)",
                           "inside": "**decoupled inside the line** (an lr cut does better)",
                           "on": "on the line (no difference detectable)"}[fr.side]
            skipped = [f"{n} where the cut {what}" for n, what in (
                (fr.no_trade, "was no trade-off (it cost no plasticity or bought no stability)"),
                (fr.outside, "left the decoupled run's just-trained loss outside the line's span"))
                if n]
            if skipped:
                reading += f"; seeds left out: {', '.join(skipped)}"
            p = fr.gap.p_value
            rows.append([name, cut, str(fr.seeds), _ci(fr.d_forgetting, 4), _ci(fr.d_just_trained, 4),
                         str(gap.n), _ci(gap, 4), _ci(fr.pct, 1), "—" if p is None else f"{p:.3g}",
                         reading])
        if not rows:
            return ""
        return ("\n\nDoes decoupling beat the lr cut, not just one of its ends? The lr cut moves shared "
                "routing along a stability-plasticity line (less forgetting, higher just-trained loss); "
                "per seed, the straight line through shared routing's two lrs gives the forgetting it "
                "would have at the decoupled run's just-trained loss, and the decoupled run's forgetting "
                "is set against it (negative: decoupled lies beyond the line). Descriptive, not one of "
                "the page's Holm-corrected claims: two lrs make a straight line, not the whole frontier, "
                "so only seeds where the cut trades (less forgetting for more just-trained loss) and "
                "the decoupled run's just-trained loss lies between shared's two are judged.\n\n"
                + _table(["control", "lr cut", "seeds", "cut - shared: forgetting",
                          "cut - shared: just-trained loss", "seeds on the line",
                          "decoupled - the line (nats)",
                          "same, % of vanilla", "p", "reading"], rows))

    def missing(self) -> list[str]:
        """Each method short of the regime's seeds, as 'label (k of n seeds)', in table order."""
        n = len(self.settings.seeds)
        done = {m: sum(1 for k in self.by if k[0] == m) for m in self.table}
        return [f"{m} ({done[m]} of {n} seeds)" for m in self.table if done[m] < n]

    def _compute(self) -> str:
        n = len(self.results)
        per = self.seconds() / n if n else 0.0
        missing = self.missing()
        short = (f" Not finished yet: {', '.join(missing)}; every figure above comes from the cells "
                 "that are, and a claim on one seed gets no p-value." if missing else "")
        return (f"{n} of {len(self.cells)} cells finished, {self.seconds() / 3600:.2f} CPU-hours in all "
                f"({per / 60:.1f} minutes per cell on 2 cores). Cells cache under `{REGIME_CACHE}/"
                f"{REGIME_STREAM}/<config hash>/<method>-s<seed>/`; "
                f"`lora-cl reproduce --regime {self.regime}` "
                "trains every missing one (`--methods a,b` and `--only-seeds 1,2` narrow it; delete a "
                "cell's folder to train it again) and "
                f"`lora-cl reproduce --regime {self.regime} --report` rewrites this page." + short)

    # -- plots ---------------------------------------------------------------------------
    def _tradeoff_plot(self) -> None:
        points = {m: [(summary_value(r.summary, "loss", "op"), forgetting_nats(r.summary))
                      for (label, _), r in self.by.items() if label == m] for m in self.methods()}
        self._scatter(points, "final mean held-out loss (nats; lower: better overall)",
                      "Stability-plasticity, one point per cell", f"regime-{self.regime}-tradeoff.png")

    def _leak_plot(self) -> None:
        points = {m: [(self._cell_leak(key), f) for key, f in self.forget.items() if key[0] == m]
                  for m in self.methods()}
        self._scatter(points, "leak: ||P dW|| / ||dW|| in the earlier domains' bases (mean, domains 2..T)",
                      "Forgetting against the protection leak, one point per cell",
                      f"regime-{self.regime}-leak.png")

    def _scatter(self, points: dict[str, list[tuple[float | None, float | None]]], xlabel: str,
                 title: str, name: str) -> None:
        """Forgetting (y) against ``xlabel`` (x), one colour per method, one point per cell."""
        from lora_cl.reproduce.plots import _plt

        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, pts in points.items():
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o", label=m, alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forgetting (nats)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        self._save(fig, plt, name)

    def _cell_leak(self, key: tuple[str, int]) -> float | None:
        return _mean([d.leak for d in self.mech[key][1:]])

    def _save(self, fig: Any, plt: Any, name: str) -> None:
        path = self.docs / "reproduction" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)


def write_page(cache: Path, settings: Settings, docs: Path, regime: str = "a") -> Path:
    """Write the regime page and its plots; return the page's path."""
    page = RegimePage(cache, settings, docs, regime)
    path = docs / page_path(regime)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page.render())
    return path


def regime_results(cache: Path, settings: Settings, regime: str = "a") -> list[CellResult]:
    """The finished regime cells (for the main page's summary)."""
    return RegimePage(cache, settings, Path("."), regime).results
