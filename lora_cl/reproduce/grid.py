"""The reproduction grid: settings, streams, the cells of each part, and where each cell lives.

A cell is one method's run over one stream with one seed under one configuration:
``<cache>/<stream>/<cfg-hash>/<label>-s<seed>/`` (a :func:`~lora_cl.trainer.stream.run_method`
run directory). The hash covers everything that changes the numbers except the method and the
seed (model, LoRA, data, training, eval, the stream's sources), so cells of different parts
that share a configuration are one cell, trained once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_cl.data.qa_tasks import DEFAULT_QA_STREAM_8
from lora_cl.data.text_domains import DEFAULT_STREAM_8, KJV_SECTION_DOMAINS, LONG_STREAM_4, TEXT_DOMAINS

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = REPO / "recipes" / "data" / "tiny"
TINY_DOMAINS = ("cooking", "astronomy", "law")

# Cost model on 2 CPU cores (SmolLM2-135M + LoRA r=8 q,k,v,o, fp32), measured on a quiet machine in
# the lm8 vanilla-s0 cell at 40 steps per domain: one training step of 4 x 128 tokens 1.8 s (72 s
# for 40 steps), one eval forward of 4 x 128 0.9 s (28 s for 8 domains x 16 blocks); scaled
# linearly in tokens. Any other job on the two cores slows both several-fold.
STEP_SECONDS_4x128 = 1.8
EVAL_SECONDS_4x128 = 0.9
# Assumed (not measured): one decoded token for a batch of 8 prompts with the KV cache.
GEN_TOKEN_SECONDS = 0.05
MODEL_LOAD_SECONDS = 20.0

#: Streams: name -> (built-in sources, trainer kind)
STREAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "lm8": (tuple(f"debian:{d}" for d in DEFAULT_STREAM_8), "trainer"),
    # eight sections of one source (the King James Bible): the high-overlap stream. (A first try,
    # English prose and Python text, measured no higher overlap than lm8 and was dropped.)
    "lm8-kjv": (tuple(f"debian:{d}" for d in KJV_SECTION_DOMAINS), "trainer"),
    "lm16": (tuple(f"debian:{d}" for d in TEXT_DOMAINS), "trainer"),
    "qa8": (tuple(f"qa:{t}" for t in DEFAULT_QA_STREAM_8), "sft"),
    # the time-scale-matched regime (lora_cl.reproduce.regime): four domains with large slices
    "lm4-long": (tuple(f"debian:{d}" for d in LONG_STREAM_4), "trainer"),
}


#: Part 3's comparison: (the natural stream, the stream built for high overlap).
OVERLAP_STREAMS = ("lm8", "lm8-kjv")

#: One line per stream for the report, where its name does not say what it is.
STREAM_NOTES: dict[str, str] = {
    "lm8-kjv": ("Eight contiguous runs of books of the King James Bible: one source, one translation "
                "and one style, built so that the domains share most of their vocabulary. (A first "
                "high-overlap stream of English prose and Python text logged no higher overlap than "
                "lm8 and was dropped; see the CHANGELOG.)"),
}


@dataclass(frozen=True)
class Settings:
    """Everything the grid's numbers depend on, besides the method and the seed."""

    model: str = "smollm2-135m"
    data: str = "debian"            # "debian" (built-in sources) or "tiny" (recipes/data/tiny)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_domains: int | None = None  # quick: the first 3 domains of every stream
    steps: int = 40  # one 8-domain cell ~14 min on 2 cores (budget: <= 20 min; see the cost model)
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 2e-4
    adam_beta1: float = 0.9   # in the recipe (and so the config hash) only when not the default
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    eval_examples: int = 16
    eval_batch: int = 8
    logging_steps: int = 5
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_new_tokens: int = 32
    # the regime grid's keys (lora_cl.reproduce.regime); in recipes and hashes only when not the
    # default, so the cells run before they existed keep their config hash
    finetune: str = "lora"           # "full": every weight trained, linear weights routed
    train_chars: int | None = None   # built-in text slices (None: 200,000 / 40,000 characters)
    eval_chars: int | None = None
    vary_eval_draw: bool = False     # the held-out examples are drawn with the cell's seed
    general: str | None = None       # eval.general: a source scored after every domain, never trained
    probe_every: int = 10            # eval.probe_every: logs between the optimizer probes (read-only,
    #                                  so not part of a cell's configuration: left out of its hash)
    # Proposition 1 (part 1)
    prop1_synthetic_steps: int = 3000
    prop1_prev_steps: int = 30
    prop1_steps: int = 24
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Adam's settings at their defaults: left out of recipes and hashes (cells from before they were
#: settings keep their keys).
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
#: The regime grid's settings at their defaults: left out of recipes, hashes and part 1's key.
REGIME_DEFAULTS = {"finetune": "lora", "train_chars": None, "eval_chars": None, "vary_eval_draw": False,
                   "general": None, "probe_every": 10}


def default_settings(*, quick: bool = False, model: str | None = None, **overrides: Any) -> Settings:
    """The full grid's settings, or ``quick`` ones (1 seed, 3 domains, few steps); ``model="tiny"``
    also switches the data to the three tiny text files and shrinks sequences and batches."""
    s = Settings()
    if quick:
        s = replace(s, seeds=(0,), max_domains=3, steps=3, eval_examples=4, logging_steps=1,
                    prop1_synthetic_steps=80, prop1_prev_steps=3, prop1_steps=4, quick=True)
    if model is not None:
        s = replace(s, model=model)
    if s.model == "tiny":
        s = replace(s, data="tiny", seq_len=32, batch_size=2, eval_batch=4, lora_r=4, lora_alpha=8,
                    targets=("q_proj", "v_proj"), lr=1e-3)
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class MethodRun:
    """A grid method: a preset with MethodSpec overrides and an optional learning-rate factor."""

    label: str
    preset: str
    overrides: dict = field(default_factory=dict)
    lr_scale: float = 1.0


M = MethodRun
#: The grid's projection methods protect lora_A only (side "in"), as when its cells were run; the
#: presets now protect both factors by default, so the one-sided setting is pinned here and the
#: "-both" labels keep the two-sided one.
#: The cells' gradient bases were built from the newest 256 rows, 32 steps of a rank-8 LoRA's 8
#: rows; a window of 32 steps keeps exactly those rows (the default is now 256 steps, subsampled).
_ROWS = {"basis_window_steps": 32}
_IN = {"side": "in", **_ROWS}
METHODS: dict[str, MethodRun] = {m.label: m for m in (
    M("vanilla", "vanilla"),
    M("gpm", "gpm", {"side": "in", "basis_out": None}),
    M("adam-nscl", "adam-nscl", _IN),
    M("ogp-fixed", "ogp-fixed", _IN),
    M("ogp", "ogp", _IN),
    M("ewc-shared", "ewc"),
    M("ewc-decoupled", "ewc", {"routing": "decoupled"}),
    M("replay-shared", "replay"),
    M("replay-decoupled", "replay", {"routing": "decoupled"}),
    M("adam-nscl-both", "adam-nscl", {"side": "both", **_ROWS}),
    M("ogp-both", "ogp", {"side": "both", **_ROWS}),
    # part 6: v_only routing ablation and effective-LR matching of shared routing, lr * (1 - alpha)
    M("ogp-fixed-v_only", "ogp-fixed", {**_IN, "routing": "v_only"}),
    M("adam-nscl-lr-matched", "adam-nscl", _IN, lr_scale=0.5),
    # m on g~, v on (1 - alpha)^2 g^2 (alpha = 0.5): sqrt of that v is (1 - alpha) sqrt(v_raw), so
    # the step is decoupled routing's at lr / (1 - alpha) (eps becomes eps / (1 - alpha)); the
    # equivalence is tested in tests/optim/test_routed_adamw.py
    M("ogp-fixed-v_scaled", "ogp-fixed", _IN, lr_scale=2.0),
)}
#: The larger grid ("more steps"): part 2's stream at LONGER_FACTOR x the steps per domain, for
#: the methods whose ranking is in question (vanilla, the best shared projection, ogp), in its own
#: cache beside the main one (``lora-cl reproduce --longer``). Sequences stay at the grid's length:
#: each domain's training slice is fixed, and 3 x 40 steps of 4 x 128 tokens already make about one
#: pass over it, so longer runs would repeat the data rather than add to it (docs/gpu.md).
LONGER_FACTOR = 3
LONGER_METHODS = ("vanilla", "gpm", "ogp")


def longer_settings(settings: Settings) -> Settings:
    """The larger grid's settings: ``settings`` at LONGER_FACTOR x the steps per domain."""
    return replace(settings, steps=settings.steps * LONGER_FACTOR)


def longer_cache(cache: str | Path) -> Path:
    """The larger grid's cell cache, beside ``cache`` (benchmarks/reproduction/cells-longer)."""
    cache = Path(cache)
    return cache.with_name(cache.name + "-longer")


#: Shared-routing baselines (modified gradient in both moments) for "best shared baseline".
SHARED_BASELINES = ("gpm", "adam-nscl", "ewc-shared", "replay-shared")


@dataclass(frozen=True)
class Part:
    """One part of the reproduction: its streams and methods (part 1 has no stream cells)."""

    number: int
    title: str
    streams: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    shared_baseline: str = ""  # the shared projection kept as the baseline, chosen from part 2
    note: str = ""


_NSCL_NOTE = "adam-nscl is the paper's Adam-NSCL baseline"

PARTS: dict[int, Part] = {p.number: p for p in (
    Part(1, "Proposition 1 measured (synthetic and during real LoRA training)"),
    Part(2, "8-domain continual language modelling", ("lm8",),
         ("vanilla", "gpm", "adam-nscl", "ogp-fixed", "ogp", "ewc-shared", "ewc-decoupled",
          "replay-shared", "replay-decoupled", "adam-nscl-both", "ogp-both")),
    Part(3, "Overlap: natural vs high-overlap stream", ("lm8-kjv",),
         ("vanilla", "gpm", "adam-nscl", "ogp-fixed", "ogp", "replay-shared"), "gpm", _NSCL_NOTE),
    Part(4, "16-domain stream", ("lm16",), ("vanilla", "gpm", "ogp", "replay-shared"), "gpm"),
    Part(5, "Q/A stream (trl SFTTrainer)", ("qa8",), ("vanilla", "gpm", "adam-nscl", "ogp", "replay-shared"),
         "gpm", _NSCL_NOTE),
    Part(6, "Causal interventions: v_only routing and effective-LR matching", ("lm8",),
         ("adam-nscl", "ogp-fixed", "ogp-fixed-v_only", "ogp-fixed-v_scaled", "adam-nscl-lr-matched")),
    Part(7, "The paper's claims beside the measurements"),
)}


def stream_sources(stream: str, settings: Settings) -> list[dict[str, str]]:
    """The stream's domains as recipe entries (tiny data: the three tiny files, cycled and renamed)."""
    sources, _ = STREAMS[stream]
    n = len(sources) if settings.max_domains is None else min(settings.max_domains, len(sources))
    if settings.data == "tiny":
        out = []
        for i in range(n):
            base = TINY_DOMAINS[i % len(TINY_DOMAINS)]
            name = base if i < len(TINY_DOMAINS) else f"{base}{i // len(TINY_DOMAINS) + 1}"
            out.append({"source": str(TINY_DATA / f"{base}.txt"), "name": name})
        return out
    return [{"source": s} for s in sources[:n]]


def runnable(stream: str, settings: Settings) -> str | None:
    """Why ``stream`` cannot run under ``settings`` (None: it can)."""
    if STREAMS[stream][1] == "sft" and settings.data == "tiny":
        return "the Q/A stream needs the built-in qa: tasks; the tiny text files have no prompts"
    return None


def recipe_dict(stream: str, method: MethodRun, seed: int, settings: Settings, out: Path) -> dict[str, Any]:
    """The recipe (for :func:`lora_cl.recipe.recipe_from_dict`) of one cell.

    Adam's betas and eps enter only when they differ from the defaults, so the cells run before
    they were settings keep their config hash.
    """
    doc = _recipe_dict(stream, method, seed, settings, out)
    doc["training"].update({k: getattr(settings, k) for k, default in ADAM_DEFAULTS.items()
                            if getattr(settings, k) != default})
    if settings.finetune != "lora":
        doc["model"]["finetune"] = settings.finetune
        del doc["lora"]
    for key in ("train_chars", "eval_chars"):
        if getattr(settings, key) is not None:
            doc["data"][key] = getattr(settings, key)
    if settings.general is not None:
        doc["eval"]["general"] = settings.general
    if settings.probe_every != 10:
        doc["eval"]["probe_every"] = settings.probe_every
    if settings.vary_eval_draw:  # the held-out draw follows the seed (popped from the hash)
        doc["data"]["seed"] = seed
    return doc


def _recipe_dict(stream: str, method: MethodRun, seed: int, settings: Settings, out: Path) -> dict[str, Any]:
    trainer = STREAMS[stream][1]
    sft = trainer == "sft"
    return {
        "model": {"name": settings.model, "dtype": "float32"},
        "domains": stream_sources(stream, settings),
        "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha,
                 "target_modules": list(settings.targets)},
        "method": {"name": method.preset, "label": method.label, **method.overrides},
        "data": {"seq_len": settings.seq_len, "eval_examples": settings.eval_examples},
        "training": {"trainer": trainer, "steps_per_domain": settings.steps,
                     "batch_size": settings.batch_size, "lr": settings.lr * method.lr_scale,
                     "save_steps": settings.steps if settings.quick else max(1, settings.steps // 2),
                     "logging_steps": settings.logging_steps,
                     "seed": seed},
        "eval": {"batch_size": settings.eval_batch, "generate": sft,
                 "max_new_tokens": settings.max_new_tokens, "metric": "exact_match" if sft else "loss"},
        "output_dir": str(out),
    }


def config_hash(stream: str, method: MethodRun, settings: Settings) -> str:
    """12 hex digits over the cell's recipe without method and seed (lr included, scaled)."""
    doc = recipe_dict(stream, method, 0, settings, Path("."))
    for key in ("method", "output_dir"):
        doc.pop(key)
    doc["training"].pop("seed")
    doc["eval"].pop("probe_every", None)  # the probes only read the optimizer's states
    if settings.vary_eval_draw:
        doc["data"]["seed"] = "cell seed"
    if settings.data == "tiny":  # absolute paths differ per checkout; the file contents do not
        doc["domains"] = [{"name": d["name"], "sha": _file_sha(Path(d["source"]))} for d in doc["domains"]]
    blob = json.dumps(doc, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One (stream, method, seed, config hash) run of the grid."""

    stream: str
    method: MethodRun
    seed: int
    cfg: str

    def run_dir(self, cache: Path) -> Path:
        return Path(cache) / self.stream / self.cfg / f"{self.method.label}-s{self.seed}"

    def complete(self, cache: Path) -> bool:
        """Whether the run finished: its summary.json says complete=true."""
        path = self.run_dir(cache) / "summary.json"
        if not path.is_file():
            return False
        try:
            return bool(json.loads(path.read_text(encoding="utf-8")).get("complete"))
        except (OSError, ValueError):
            return False


def chosen_methods(parts: Sequence[int], text: str | None) -> list[str] | None:
    """``--methods`` as a list (None: each part's all); ValueError naming each chosen part's methods
    when a name is in none of ``parts`` or none is given."""
    if text is None:
        return None
    methods = [m.strip() for m in text.split(",") if m.strip()]
    offered = {m for p in parts for m in PARTS[p].methods}
    unknown = [m for m in methods if m not in offered]
    if methods and not unknown:
        return methods
    listing = "; ".join(f"part {p}: {', '.join(PARTS[p].methods)}" for p in parts if PARTS[p].methods)
    named = ", ".join(unknown) if unknown else "(empty)"
    raise ValueError(f"--methods {named} {'is not a method' if len(unknown) <= 1 else 'are not methods'} "
                     f"of part(s) {','.join(map(str, parts))}; the methods there are "
                     f"{listing or 'none (these parts train no cells)'}")


def part_cells(part: int, settings: Settings, methods: tuple[str, ...] | None = None) -> list[Cell]:
    """The cells of ``part`` (optionally only ``methods``), in run order (seed-major)."""
    p = PARTS[part]
    chosen = [m for m in p.methods if methods is None or m in methods]
    cells = []
    for stream in p.streams:
        for seed in settings.seeds:
            for label in chosen:
                m = METHODS[label]
                cells.append(Cell(stream, m, seed, config_hash(stream, m, settings)))
    return cells


def estimate_run_seconds(stream: str, settings: Settings) -> float:
    """Estimated wall time of one cell on 2 CPU cores (see the cost constants above)."""
    T = len(stream_sources(stream, settings))
    tokens = settings.seq_len / 128
    step = STEP_SECONDS_4x128 * tokens * settings.batch_size / 4
    batches = math.ceil(settings.eval_examples / settings.eval_batch)
    eval_batch = EVAL_SECONDS_4x128 * tokens * settings.eval_batch / 4
    if STREAMS[stream][1] == "sft":
        eval_batch += GEN_TOKEN_SECONDS * settings.max_new_tokens
    evals = (T + 1) * T * batches * eval_batch  # base model, then after every domain, all domains
    return MODEL_LOAD_SECONDS + T * settings.steps * step + evals


def estimate_prop1_seconds(settings: Settings, n_alphas: int = 8) -> float:
    """Part 1's real-training probe: one previous domain, then 2 routings x n_alphas short runs."""
    tokens = settings.seq_len / 128
    step = STEP_SECONDS_4x128 * tokens * settings.batch_size / 4
    return MODEL_LOAD_SECONDS + (settings.prop1_prev_steps + 2 * n_alphas * settings.prop1_steps) * step
