"""Continual-learning metrics from a score matrix: OP, BWT (TRACE and GEM), forgetting, FWT.

``R[t][i]`` is the score on domain ``i`` after training domain ``t`` (rows: training steps,
columns: evaluated domains; 0-based here, T domains). Every entry must be a finite number.

Sign convention. Differences are taken on the oriented matrix ``S = R`` when
``higher_is_better`` (accuracy, ROUGE) and ``S = -R`` otherwise (loss, perplexity), so for every
kind of score: BWT < 0 and forgetting > 0 mean old domains got worse, FWT > 0 means training
on earlier domains helped a domain before it was trained on. Differences keep R's units (a
forgetting of 0.3 on a loss matrix means the loss rose by 0.3 nats). OP is a level, not a
difference: it is reported in R's own units and direction (mean final loss for a loss matrix).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from lora_cl.paths import atomic_write_text

Matrix = Sequence[Sequence[float]] | np.ndarray
BwtConvention = Literal["trace", "gem"]


def as_matrix(R: Matrix, name: str = "R") -> np.ndarray:
    """Validate ``R`` as a square T x T matrix of finite numbers; return a float64 copy."""
    if not isinstance(R, np.ndarray):
        rows = list(R)
        for t, row in enumerate(rows):
            if isinstance(row, str | bytes) or not hasattr(row, "__len__"):
                raise ValueError(f"{name} must be a list of rows; row {t} is {row!r}")
            if len(row) != len(rows):
                raise ValueError(
                    f"{name} must be square (T x T, here T = {len(rows)} rows), "
                    f"but row {t} has {len(row)} entries"
                )
    try:
        A = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must hold numbers: {err}") from err
    if A.size == 0:
        raise ValueError(f"{name} is empty: need at least one training step")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square T x T matrix, got shape {A.shape}")
    bad = np.argwhere(~np.isfinite(A))
    if bad.size:
        where = ", ".join(f"[{t}][{i}]" for t, i in bad[:5].tolist())
        raise ValueError(
            f"{name} has {len(bad)} non-finite (NaN or inf) entries, at {where}: "
            f"every domain must be scored after every training step"
        )
    return A


def op(R: Matrix) -> float:
    """Overall performance (OP = AP = AA): mean final score, OP = (1/T) sum_i R[T-1][i]."""
    return float(as_matrix(R)[-1].mean())


def bwt(
    R: Matrix, convention: BwtConvention = "trace", *, higher_is_better: bool = True
) -> float:
    """Backward transfer; negative means earlier domains got worse.

    TRACE: BWT = (1/T) sum_{i=0}^{T-1} (S[T-1][i] - S[i][i])   (the i = T-1 term is 0);
    GEM (Lopez-Paz & Ranzato): BWT = (1/(T-1)) sum_{i=0}^{T-2} (S[T-1][i] - S[i][i]).
    So BWT_trace = (T-1)/T * BWT_gem. GEM needs T >= 2.
    """
    S = _oriented(R, higher_is_better)
    T = len(S)
    diffs = S[-1] - np.diag(S)
    if convention == "trace":
        return float(diffs.sum() / T)
    if convention == "gem":
        _need_two(T, "BWT (GEM convention)")
        return float(diffs[:-1].sum() / (T - 1))
    raise ValueError(f"convention must be 'trace' or 'gem', got {convention!r}")


def forgetting_per_domain(R: Matrix, *, higher_is_better: bool = True) -> list[float]:
    """Chaudhry forgetting of each domain i < T-1: f_i = max_{t in [i, T-2]} S[t][i] - S[T-1][i].

    The best score seen from the step domain i was trained until the step before the last,
    minus the final score. (Chaudhry et al. take the max over all t < T-1; steps before i are
    left out here since domain i had not been trained yet.) Negative f_i: the final model is
    better on i than ever before.
    """
    S = _oriented(R, higher_is_better)
    T = len(S)
    _need_two(T, "forgetting")
    return [float(S[i : T - 1, i].max() - S[T - 1, i]) for i in range(T - 1)]


def forgetting(R: Matrix, *, higher_is_better: bool = True) -> float:
    """Mean Chaudhry forgetting F = (1/(T-1)) sum_{i<T-1} f_i (see ``forgetting_per_domain``)."""
    return float(np.mean(forgetting_per_domain(R, higher_is_better=higher_is_better)))


def fwt(R: Matrix, base: Sequence[float], *, higher_is_better: bool = True) -> float:
    """Forward transfer (Lopez-Paz & Ranzato): FWT = (1/(T-1)) sum_{i=1}^{T-1} (S[i-1][i] - b_i).

    ``base[i]`` is the untrained base model's score on domain i (oriented like S).
    """
    S = _oriented(R, higher_is_better)
    T = len(S)
    _need_two(T, "FWT")
    b = _base_vector(base, T) * (1.0 if higher_is_better else -1.0)
    return float(np.mean([S[i - 1, i] - b[i] for i in range(1, T)]))


def adapt_at_k(curve: Sequence[float], k: int, *, window: int = 1) -> float:
    """Score after k steps on a new domain (plasticity, e.g. adapt@500).

    ``curve[s]`` is the score after s steps on the domain (``curve[0]``: before training it).
    With ``window`` > 1 the mean of curve[k-window+1 .. k] smooths a noisy per-step loss.
    """
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"curve must be a 1-D sequence of scores, got shape {values.shape}")
    if not 0 <= k < len(values):
        raise ValueError(f"k = {k} is outside the curve, which covers steps 0..{len(values) - 1}")
    if not 1 <= window <= k + 1:
        raise ValueError(f"window must be in 1..k+1 = 1..{k + 1}, got {window}")
    chunk = values[k - window + 1 : k + 1]
    if not np.isfinite(chunk).all():
        raise ValueError(f"curve has non-finite values between steps {k - window + 1} and {k}")
    return float(chunk.mean())


def summarize(
    R: Matrix,
    base: Sequence[float] | None = None,
    higher_is_better: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All metrics in one JSON-ready dict; those undefined for T = 1 (or without base) are None."""
    A = as_matrix(R)
    T = len(A)
    if names is not None and len(names) != T:
        raise ValueError(f"names must name the {T} domains, got {len(names)}")
    hib = higher_is_better
    many = T >= 2
    return {
        "T": T,
        "domains": list(names) if names is not None else None,
        "higher_is_better": hib,
        "op": op(A),
        "final": A[-1].tolist(),
        "diagonal": np.diag(A).tolist(),
        "bwt_trace": bwt(A, "trace", higher_is_better=hib),
        "bwt_gem": bwt(A, "gem", higher_is_better=hib) if many else None,
        "forgetting": forgetting(A, higher_is_better=hib) if many else None,
        "forgetting_per_domain": forgetting_per_domain(A, higher_is_better=hib) if many else [],
        "fwt": fwt(A, base, higher_is_better=hib) if many and base is not None else None,
        "base": _base_vector(base, T).tolist() if base is not None else None,
    }


def to_csv(R: Matrix, names: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Write R as CSV (atomically): one row per training step, one column per evaluated domain."""
    A = as_matrix(R)
    if len(names) != len(A):
        raise ValueError(f"names must name the {len(A)} domains, got {len(names)}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["after_training", *names])
    for name, row in zip(names, A.tolist(), strict=True):
        writer.writerow([name, *(repr(x) for x in row)])
    atomic_write_text(path, buf.getvalue())


def matrix_to_json(
    R: Matrix,
    names: Sequence[str] | None = None,
    *,
    base: Sequence[float] | None = None,
    higher_is_better: bool = True,
) -> str:
    """R, its domains, base scores and :func:`summarize` as one JSON document."""
    A = as_matrix(R)
    doc = {
        "R": A.tolist(),
        "domains": list(names) if names is not None else None,
        "base": _base_vector(base, len(A)).tolist() if base is not None else None,
        "higher_is_better": higher_is_better,
        "summary": summarize(A, base, higher_is_better, names),
    }
    return json.dumps(doc, indent=2) + "\n"


def matrix_from_json(text: str) -> dict[str, Any]:
    """Parse :func:`matrix_to_json` output; ``"R"`` comes back as a validated numpy matrix."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or "R" not in doc:
        raise ValueError("not a lora-cl score matrix document: no 'R' key")
    doc["R"] = as_matrix(doc["R"])
    return doc


def _oriented(R: Matrix, higher_is_better: bool) -> np.ndarray:
    """S = R when higher is better, else S = -R, so that 'worse' is always 'smaller'."""
    A = as_matrix(R)
    return A if higher_is_better else -A


def _base_vector(base: Sequence[float], T: int) -> np.ndarray:
    b = np.asarray(base, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"base must hold one score per domain (T = {T}), got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"base has non-finite entries: {b.tolist()}")
    return b


def _need_two(T: int, what: str) -> None:
    if T < 2:
        raise ValueError(f"{what} needs at least 2 domains, R is {T} x {T}")
