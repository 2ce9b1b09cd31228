"""Run the grid: every missing cell of the chosen parts, skipping finished ones.

A stream cell is finished when its run directory's ``summary.json`` says ``complete: true``;
an interrupted one resumes from its last complete domain. Part 1's results are JSON files
under ``<cache>/prop1/<hash>/`` with ``complete: true``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_cl.reproduce.grid import (
    ADAM_DEFAULTS,
    METHODS,
    PARTS,
    REGIME_DEFAULTS,
    Cell,
    Settings,
    part_cells,
    recipe_dict,
    runnable,
    stream_sources,
)

Log = Callable[[str], None]
PROP1_STREAM = "lm8"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prop1_dir(cache: Path, settings: Settings) -> Path:
    """Where part 1's results live: keyed by every setting they depend on."""
    keys = {k: v for k, v in settings.to_dict().items() if k not in ("seeds", "steps", "eval_examples",
                                                                        "eval_batch", "logging_steps",
                                                                        "max_new_tokens", "quick")}
    for key, default in {**ADAM_DEFAULTS, **REGIME_DEFAULTS}.items():  # added later: at defaults, no change
        if keys.get(key) == default:
            keys.pop(key)
    keys["sources"] = stream_sources(PROP1_STREAM, replace(settings, max_domains=2))
    if settings.data == "tiny":
        keys["sources"] = [d["name"] for d in keys["sources"]]
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache) / "prop1" / digest


def prop1_paths(cache: Path, settings: Settings) -> dict[str, Path]:
    root = prop1_dir(cache, settings)
    out = {"synthetic": root / "synthetic.json"}
    for seed in settings.seeds:
        out[f"real-s{seed}"] = root / f"real-s{seed}.json"
    return out


def is_complete(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def run_prop1_part(cache: Path, settings: Settings, log: Log) -> list[Path]:
    """Part 1: the synthetic measurement (both basis kinds) and the real-training probe per seed."""
    from lora_cl.diagnostics.prop1 import points_to_dicts, run_prop1
    from lora_cl.recipe import recipe_from_dict
    from lora_cl.reproduce.prop1_real import run_prop1_real, write_result

    written = []
    for key, path in prop1_paths(cache, settings).items():
        if is_complete(path):
            log(f"lora-cl reproduce: part 1 {key}: cached ({path})")
            continue
        if key == "synthetic":
            log(f"lora-cl reproduce: part 1 synthetic, {settings.prop1_synthetic_steps} steps x 2 "
                "routings x 8 alphas x 2 bases")
            import time

            start = time.perf_counter()
            results = {kind: points_to_dicts(run_prop1(steps=settings.prop1_synthetic_steps, basis=kind))
                       for kind in ("aligned", "rotated")}
            doc = {"complete": True, "steps": settings.prop1_synthetic_steps, "seed": 0,
                   "overlap": 0.5, "results": results, "train_seconds": time.perf_counter() - start}
        else:
            seed = int(key.rsplit("-s", 1)[1])
            two = replace(settings, max_domains=2)
            rd = recipe_dict(PROP1_STREAM, METHODS["ogp-fixed"], seed, two, path.parent)
            recipe = recipe_from_dict(rd)
            log(f"lora-cl reproduce: part 1 real training, seed {seed}")
            doc = run_prop1_real(recipe, prev_steps=settings.prop1_prev_steps,
                                 steps=settings.prop1_steps, seed=seed, log=log)
            doc["model"] = settings.model
        write_result(path, doc)
        written.append(path)
    return written


def run_cell(cell: Cell, cache: Path, settings: Settings, *, data: Any = None, progress: bool = False,
             log: Log) -> Path:
    """Train one cell (resuming an interrupted one); return its run directory."""
    import shutil

    from lora_cl.recipe import recipe_from_dict
    from lora_cl.trainer.stream import resume_gap, run_method

    run_dir = cell.run_dir(cache)
    recipe = recipe_from_dict(recipe_dict(cell.stream, cell.method, cell.seed, settings, run_dir.parent))
    choice = recipe.method
    missing = resume_gap(run_dir, recipe.domain_names())
    if missing:  # an interrupted cell whose heavy files are gone (they are not kept in git)
        log(f"lora-cl reproduce: {run_dir}: an interrupted cell without {', '.join(missing)} to resume "
            "from; training it again from the start")
        shutil.rmtree(run_dir)
    run_method(recipe, choice, run_dir, data=data, resume=(run_dir / "run.json").is_file(),
               progress=progress, log=log)
    prune_cell(run_dir)
    return run_dir


def prune_cell(run_dir: Path) -> None:
    """Keep a finished cell's JSON and CSV (what the report reads; small enough to commit) only.

    Adapters, optimizer states, bases, checkpoints, plots and per-run reports are dropped, so the
    cache can live in git and the grid can finish over several sessions.
    """
    import shutil

    for heavy in ("checkpoints", "plots", "report.md"):
        target = run_dir / heavy
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for ddir in (run_dir / "domains").glob("*"):
        for weights in ("adapter", "model"):
            shutil.rmtree(ddir / weights, ignore_errors=True)
        for name in ("optimizer.pt", "bank.safetensors"):
            (ddir / name).unlink(missing_ok=True)


def run_grid(parts: Sequence[int], cache: str | Path, settings: Settings, *,
             methods: Sequence[str] | None = None, progress: bool = False,
             log: Log | None = None) -> dict[str, Any]:
    """Run every unfinished cell of ``parts``; return counts of trained, cached and skipped cells,
    and under ``failed`` the run directories of the cells that raised (the others still ran)."""
    log = log or _stderr
    cache = Path(cache)
    counts: dict[str, Any] = {"trained": 0, "cached": 0, "not_runnable": 0, "prop1_written": 0}
    counts["failed"] = failed = []
    if 1 in parts:
        counts["prop1_written"] = len(run_prop1_part(cache, settings, log))
    seen: set[Path] = set()
    data_cache: dict[tuple[Any, ...], Any] = {}
    for part in parts:
        if part == 1 or not PARTS[part].streams:
            continue
        cells = part_cells(part, settings, tuple(methods) if methods else None)
        for k, cell in enumerate(cells):
            run_dir = cell.run_dir(cache)
            if run_dir in seen:
                continue
            seen.add(run_dir)
            why = runnable(cell.stream, settings)
            if why:
                counts["not_runnable"] += 1
                continue
            if cell.complete(cache):
                counts["cached"] += 1
                log(f"lora-cl reproduce: part {part} cell {k + 1}/{len(cells)} {run_dir}: cached")
                continue
            log(f"lora-cl reproduce: part {part} cell {k + 1}/{len(cells)} -> {run_dir}")
            if try_cell(cell, cache, settings, data_cache, progress=progress, log=log, failed=failed):
                counts["trained"] += 1
    return counts


def try_cell(cell: Cell, cache: Path, settings: Settings, data_cache: dict[tuple[Any, ...], Any], *,
             progress: bool, log: Log, failed: list[str]) -> bool:
    """:func:`train_cell`, where one cell's error does not stop an unattended grid: it is logged
    with its traceback, the cell's run directory is appended to ``failed`` (left as it is, so a
    rerun resumes or retries it) and False is returned. Ctrl-C still stops the grid."""
    try:
        train_cell(cell, cache, settings, data_cache, progress=progress, log=log)
    except Exception as exc:  # reported here and in the command's exit status
        run_dir = cell.run_dir(cache)
        log(traceback.format_exc().rstrip())
        log(f"lora-cl reproduce: {run_dir} failed ({type(exc).__name__}: {exc}); going on with the "
            "other cells (rerun the command to retry it)")
        failed.append(str(run_dir))
        return False
    return True


def report_failed(failed: Sequence[str]) -> int:
    """Name the cells that failed on stderr; the command's exit status: 1 when any did, else 0."""
    for run_dir in failed:
        print(f"lora-cl reproduce: error: cell {run_dir} failed (its traceback is above); rerun the "
              "command to retry it", file=sys.stderr)
    return 1 if failed else 0


def train_cell(cell: Cell, cache: Path, settings: Settings, data_cache: dict[tuple[Any, ...], Any], *,
               progress: bool, log: Log) -> Path:
    """:func:`run_cell` with the stream's tokenised data, tokenised once per process: the data depend
    on the stream and the data settings only (and on the seed where it draws the held-out set).
    ``data_cache`` keeps the latest stream's data only."""
    from lora_cl.recipe import recipe_from_dict
    from lora_cl.trainer.stream import load_stream_data

    key = (cell.stream, cell.cfg, cell.seed if settings.vary_eval_draw else None)
    if key not in data_cache:
        recipe = recipe_from_dict(recipe_dict(cell.stream, cell.method, cell.seed, settings,
                                              cell.run_dir(cache).parent))
        data_cache.clear()
        data_cache[key] = load_stream_data(recipe, log)[0]
    return run_cell(cell, cache, settings, data=data_cache[key], progress=progress, log=log)
