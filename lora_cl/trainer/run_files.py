"""The files of one stream run: metadata, per-domain checkpoints and the score matrices.

``<run>/run.json`` (what reproduces the run), ``base_eval.json`` (the base model's scores),
``domains/<ii>-<name>/`` (written atomically at each domain end: ``adapter/``,
``bank.safetensors``, ``optimizer.pt``, ``callback.json``, ``metrics.json``), and, rebuilt from
the domain directories after each domain, ``matrix.json``, ``matrix_<metric>.csv`` and
``summary.json``. A domain directory exists only when complete, so it is the resume point.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lora_cl import metrics as M
from lora_cl.paths import atomic_write_text

# direction of every eval metric we record (True: higher is better)
HIGHER_IS_BETTER = {"loss": False, "ppl": False, "exact_match": True, "rougeL": True}


def domain_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "domains" / f"{index:02d}-{name}"


def finished_domains(run_dir: Path, names: Sequence[str]) -> int:
    """How many of ``names`` (in order) have a complete domain directory."""
    done = 0
    for i, name in enumerate(names):
        if not (domain_dir(run_dir, i, name) / "metrics.json").is_file():
            break
        done += 1
    return done


def write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of everything that changes the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("lora-cl", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed",
                "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def device() -> str:
    """Where the numbers were computed: the GPU's name, else the CPU and its core count."""
    import os

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"{platform.machine() or 'cpu'} CPU, {os.cpu_count()} cores"


def git_commit() -> str | None:
    """The lora-cl checkout's commit (``-dirty`` with local changes), None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def primary_metric(requested: str, has_generation: bool) -> str:
    """``eval.metric``: ``auto`` is exact match when every domain generates answers, else loss."""
    if requested != "auto":
        return requested
    return "exact_match" if has_generation else "loss"


def rebuild_matrices(run_dir: Path, names: Sequence[str], primary: str) -> dict[str, Any]:
    """matrix.json, matrix_<metric>.csv and summary.json from the finished domain directories."""
    base = read_json(run_dir / "base_eval.json")["eval"]
    done = finished_domains(run_dir, names)
    rows = [read_json(domain_dir(run_dir, i, names[i]) / "metrics.json") for i in range(done)]
    T = len(names)
    doc: dict[str, Any] = {"domains": list(names), "primary": primary, "metrics": {}}
    summary: dict[str, Any] = {"complete": done == T, "finished": done, "T": T, "primary": primary,
                               "metrics": {}}
    for metric, hib in HIGHER_IS_BETTER.items():
        if not all(metric in e for e in base):
            continue
        R = [[float(e[metric]) for e in row["eval"]] for row in rows]
        base_row = [float(e[metric]) for e in base]
        finite = all(math.isfinite(x) for r in R for x in r)
        full = done == T and finite
        s = M.summarize(R, base_row, hib, names) if full else None
        doc["metrics"][metric] = {"R": R, "base": base_row, "higher_is_better": hib, "summary": s}
        summary["metrics"][metric] = s
        if full:
            M.to_csv(R, names, run_dir / f"matrix_{metric}.csv")
    summary["plasticity"] = plasticity(rows)
    # per domain: the share of its update inside the earlier domains' protected subspace
    summary["protection_leak"] = [row.get("protection_leak") for row in rows]
    general = general_summary(read_json(run_dir / "base_eval.json").get("general"), rows)
    if general is not None:
        summary["general"] = general
    write_json(run_dir / "matrix.json", doc)
    write_json(run_dir / "summary.json", summary)
    return doc


def general_summary(base: Mapping[str, Any] | None,
                    rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per metric of the eval.general set: the base model's score, the score after each domain,
    and ``delta`` = last - base (loss: > 0 is general ability lost; exact match: < 0 is)."""
    if base is None:
        return None
    out: dict[str, Any] = {}
    for metric, value in base.items():
        if metric not in HIGHER_IS_BETTER:
            continue
        after = [float(row["general"][metric]) for row in rows if metric in (row.get("general") or {})]
        out[metric] = {"base": float(value), "after": after,
                       "delta": after[-1] - float(value) if after else None}
    return out


def plasticity(rows: Sequence[Mapping[str, Any]], k: int = 5) -> dict[str, list[float | None]]:
    """Per domain: training loss after k logged steps (adapt@k) and at the domain's end."""
    adapt, final = [], []
    for row in rows:
        curve = [float(h["loss"]) for h in row.get("log_history", []) if "loss" in h]
        adapt.append(M.adapt_at_k(curve, min(k, len(curve)) - 1) if curve else None)
        final.append(curve[-1] if curve else None)
    return {"adapt_at_5_logs": adapt, "final_train_loss": final}
