"""The time-scale-matched regime: the grid where Adam's second moment can undo a modifier.

The main grid runs 40-120 steps per domain with beta2 = 0.999 (a horizon of ~1,000 steps), so v
never reflects the current domain and routing acts on a small share of it. Here every domain runs
at least 5 horizons of beta2 and of the overlap EMA (``steps x (1 - beta2) >= 5``, ``steps x
(1 - beta) >= 5``) with at most ~1 pass over its training slice: regime (a) of the evidence issue,
the paper's own setting scaled to 2 CPU cores — full-parameter training from scratch of a small
Llama (``scratch-5m``: d = 256, 4 layers, its own 8k BPE tokenizer) on a 4-domain stream
(``lm4-long``), every linear weight routed with input-side gradient-row bases.

The methods are like for like: the same bases (gradient rows, rank 32, one side), the same alpha
(fixed 0.5 or alpha_max 0.5) and the same EMA, so each pair differs in routing alone: the 2 x 2 of
routing (shared, decoupled) x strength (fixed, overlap-adaptive), hard projection (alpha = 1)
shared vs decoupled, the v_only ablation and a bias-corrected overlap EMA (lora-cl's own rule).
Regime (b) is the plugin's own setting: SmolLM2-135M + LoRA (both factors protected) with beta2
and the EMA scaled so the same rule holds at a CPU-affordable step count. Cells live in their own
cache (``benchmarks/reproduction/cells-regime``) with their own hashes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_cl.data.text_domains import LONG_EVAL_CHARS, LONG_TRAIN_CHARS
from lora_cl.reproduce.grid import Cell, MethodRun, Settings, config_hash, default_settings

Log = Callable[[str], None]
REGIME_STREAM = "lm4-long"
REGIME_CACHE = "benchmarks/reproduction/cells-regime"
#: Horizons every domain must span (of beta2 and of the overlap EMA) for a cell to be in regime.
MIN_HORIZONS = 5

M = MethodRun
#: The regimes: (a) the paper's setting scaled down (full training from scratch), (b) the plugin's
#: (SmolLM2-135M + LoRA, both factors protected) with beta2 and the overlap EMA scaled to the steps.
REGIMES = ("a", "b")
#: The overlap EMA's beta per regime (the presets' 0.98 in a; 0.95 in b, 5 horizons in 100 steps).
EMA_BETA = {"a": 0.98, "b": 0.95}
#: The lr check's factors on the regime's lr (its own cells: lr is in the config hash).
LR_SCALES = (0.5, 2.0)
#: The regime that runs the lr check (vanilla and overlap-decoupled at each of LR_SCALES).
LR_CHECK_REGIME = "a"
#: The effective-lr controls' lr factors on hard-shared and fixed-shared (see regime_methods).
HARD_SHARED_LR_SCALE = 0.5
FIXED_SHARED_LR_SCALE = 0.8
#: Regime (b) only: fixed-shared at the lr whose just-trained loss matches fixed-decoupled's (2.985,
#: between shared's 2.980 at 1x and 2.994 at 0.8x with 3 seeds each: ~0.93x by the line), so the
#: control compares forgetting at equal plasticity instead of along a line through two lrs.
MATCHED_LR_SCALE = 0.9
#: Replay's buffer: 10% of each domain's training examples (regime a: ~250 blocks of 128 tokens).
REPLAY_FRACTION = 0.1


def regime_cache(main_cache: str | Path) -> Path:
    """The regime cells' cache beside the main grid's (benchmarks/reproduction/cells-regime)."""
    main_cache = Path(main_cache)
    return main_cache.with_name(main_cache.name + "-regime")


def lr_variant(label: str) -> tuple[str, float] | None:
    """(base label, lr factor) of an lr-check method ``base@lr<factor>x``; None for the others."""
    base, sep, rest = label.partition("@lr")
    return (base, float(rest.rstrip("x"))) if sep else None


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")


def regime_methods(regime: str = "a") -> dict[str, MethodRun]:
    """The regime's methods, like for like: one basis rule (gradient rows, rank 32), one side per
    regime (a: the input side of each full weight, as GPM; b: both LoRA factors, the presets'
    default), alpha 0.5 (fixed) or alpha_max 0.5 (adaptive), one EMA beta; pairs differ in routing."""
    _check_regime(regime)
    side = {"side": "in"} if regime == "a" else {}
    ema = {} if regime == "a" else {"beta": EMA_BETA[regime]}
    hard = {**side, "alpha": 1.0, "weighted": False}
    replay = {"replay_fraction": REPLAY_FRACTION}
    return {m.label: m for m in (
        M("vanilla", "vanilla"),
        M("fixed-shared", "adam-nscl", side),
        M("fixed-decoupled", "ogp-fixed", side),
        M("overlap-shared", "ogp", {**side, **ema, "routing": "shared"}),
        M("overlap-decoupled", "ogp", {**side, **ema}),
        M("hard-shared", "adam-nscl", hard),
        M("hard-decoupled", "ogp-fixed", hard),
        M("fixed-v_only", "ogp-fixed", {**side, "routing": "v_only"}),
        M("overlap-debiased", "ogp-debiased", {**side, **ema}),
        M("ewc-shared", "ewc"),
        M("ewc-decoupled", "ewc", {"routing": "decoupled"}),
        M("replay-shared", "replay", replay),
        M("replay-decoupled", "replay", {**replay, "routing": "decoupled"}),
        # the lr check (regime a: the issue asks it of one regime, and a's cells are the cheap
        # ones): vanilla and the paper's method at half and twice the regime's lr
        *(M(f"{base.label}@lr{scale:g}x", base.preset, base.overrides, lr_scale=scale)
          for base in (M("vanilla", "vanilla"), M("overlap-decoupled", "ogp", {**side, **ema}))
          for scale in (LR_SCALES if regime == LR_CHECK_REGIME else ())),
        # the effective-lr control: decoupled routing of a hard projection takes smaller steps in
        # every direction (v keeps the in-subspace energy that m lost), so shared routing at half
        # the lr asks whether decoupling beats a plain lr cut on the stability-plasticity frontier
        M(f"hard-shared@lr{HARD_SHARED_LR_SCALE:g}x", "adam-nscl", hard, lr_scale=HARD_SHARED_LR_SCALE),
        # and for the fixed pair: shared routing at the lr its measured old-direction inflation
        # (eta_U shared / decoupled, 1.27 at alpha 0.5 when this control was chosen) asks for
        M(f"fixed-shared@lr{FIXED_SHARED_LR_SCALE:g}x", "adam-nscl", side, lr_scale=FIXED_SHARED_LR_SCALE),
        *([M(f"fixed-shared@lr{MATCHED_LR_SCALE:g}x", "adam-nscl", side, lr_scale=MATCHED_LR_SCALE)]
          if regime == "b" else []),
    )}


REGIME_METHODS = regime_methods("a")
#: The methods most cells are spent on: vanilla and the 2 x 2 of routing x strength.
CORE_METHODS = ("vanilla", "fixed-shared", "fixed-decoupled", "overlap-shared", "overlap-decoupled")
#: The routing pairs the page compares: (label, shared, decoupled), each differing in routing only.
PAIRS = (
    ("fixed strength (alpha 0.5)", "fixed-shared", "fixed-decoupled"),
    ("overlap-adaptive strength (alpha_max 0.5)", "overlap-shared", "overlap-decoupled"),
    ("hard projection (alpha 1, unweighted)", "hard-shared", "hard-decoupled"),
    ("importance rescaling (EWC, lam 0.5)", "ewc-shared", "ewc-decoupled"),
    (f"replay ({REPLAY_FRACTION:.0%} buffer, rho 0.5)", "replay-shared", "replay-decoupled"),
)

#: The pairs whose modifier is a projection (fixed, overlap-adaptive, hard): Proposition 1's case.
PROJECTION_PAIRS = PAIRS[:3]

#: Controls the page also tests (in the same Holm family): (label, other, decoupled), where the
#: other run differs from the decoupled one in routing AND lr, to tell routing from a plain lr cut.
CONTROLS = (
    ("effective-lr control (hard projection)", f"hard-shared@lr{HARD_SHARED_LR_SCALE:g}x",
     "hard-decoupled"),
    ("effective-lr control (fixed strength)", f"fixed-shared@lr{FIXED_SHARED_LR_SCALE:g}x",
     "fixed-decoupled"),
    ("plasticity-matched lr control (fixed strength)", f"fixed-shared@lr{MATCHED_LR_SCALE:g}x",
     "fixed-decoupled"),
)


def regime_settings(regime: str = "a", *, quick: bool = False, model: str | None = None,
                    **overrides: Any) -> Settings:
    """A regime's settings on 2 CPU cores; every domain spans >= 5 horizons of beta2 and of the EMA.

    (a): scratch-5m trained in full, 250 steps of 8 x 128 tokens per domain, beta2 = 0.98 (horizon
    50), lr 1e-3, 5 seeds. (b): SmolLM2-135M + LoRA r = 8 on q, k, v, o, 100 steps of 4 x 128
    tokens, beta2 = 0.95 (horizon 20), lr 2e-4, 3 seeds, general ability scored on gcide. Seeds also
    draw the held-out examples. ``quick``: the tiny model on the tiny text files, a few steps (a
    smoke test of the code path, not evidence).
    """
    _check_regime(regime)
    # a probe at every log: the page reads Adam's v once it reflects the domain (regime_doc.settled_step)
    s = replace(default_settings(), seq_len=128, train_chars=LONG_TRAIN_CHARS, eval_chars=LONG_EVAL_CHARS,
                eval_examples=32, logging_steps=10, vary_eval_draw=True, probe_every=1)
    if regime == "a":
        s = replace(s, model="scratch-5m", finetune="full", seeds=(0, 1, 2, 3, 4), steps=250, batch_size=8,
                    lr=1e-3, adam_beta2=0.98, eval_batch=16)
    else:
        s = replace(s, seeds=(0, 1, 2), steps=100, batch_size=4, lr=2e-4, adam_beta2=0.95, eval_batch=8,
                    general="debian:gcide")
    if quick or model == "tiny":
        s = replace(s, model="tiny", data="tiny", train_chars=None, eval_chars=None, seq_len=32,
                    batch_size=2, eval_batch=4, eval_examples=4, general=None, lora_r=4, lora_alpha=8,
                    targets=("q_proj", "v_proj"), lr=1e-3 if regime == "b" else s.lr)
    if quick:
        s = replace(s, seeds=(0,), max_domains=3, steps=3, logging_steps=1, quick=True)
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def horizons(settings: Settings, regime: str = "a") -> dict[str, float]:
    """Steps per domain in horizons of beta2 and of the overlap EMA: both >= 5 in regime."""
    return {"beta2": settings.steps * (1 - settings.adam_beta2),
            "overlap_ema": settings.steps * (1 - EMA_BETA[regime])}


def regime_cells(settings: Settings, methods: Sequence[str] | None = None, regime: str = "a") -> list[Cell]:
    """The regime grid's cells, seed-major (each seed's comparison completes before the next)."""
    table = regime_methods(regime)
    unknown = [m for m in methods or () if m not in table]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a regime method; the regime methods are "
                         f"{', '.join(table)}")
    chosen = [m for m in table if methods is None or m in methods]
    return [Cell(REGIME_STREAM, table[label], seed, config_hash(REGIME_STREAM, table[label], settings))
            for seed in settings.seeds for label in chosen]


def run_regime(cache: str | Path, settings: Settings, *, methods: Sequence[str] | None = None,
               regime: str = "a", progress: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Train every unfinished regime cell (an interrupted one resumes); return trained/cached counts
    and under ``failed`` the run directories of the cells that raised (the others still ran)."""
    from lora_cl.reproduce.runner import try_cell

    log = log or _stderr
    cache = Path(cache)
    counts: dict[str, Any] = {"trained": 0, "cached": 0}
    counts["failed"] = failed = []
    cells = regime_cells(settings, methods, regime)
    data: dict[tuple[Any, ...], Any] = {}
    for k, cell in enumerate(cells):
        run_dir = cell.run_dir(cache)
        if cell.complete(cache):
            counts["cached"] += 1
            log(f"lora-cl reproduce: regime {regime} cell {k + 1}/{len(cells)} {run_dir}: cached")
            continue
        log(f"lora-cl reproduce: regime {regime} cell {k + 1}/{len(cells)} -> {run_dir}")
        if try_cell(cell, cache, settings, data, progress=progress, log=log, failed=failed):  # draw: per seed
            counts["trained"] += 1
    return counts


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_regime_report(cache: str | Path, settings: Settings, docs: str | Path = "docs",
                        regime: str = "a") -> Path:
    """Regenerate ``<docs>/reproduction/regime-<regime>.md`` (and its plots) from the regime cache."""
    from lora_cl.reproduce.regime_doc import write_page

    return write_page(Path(cache), settings, Path(docs), regime)
