"""Continual-learning metrics against hand-computed 3x3 score and loss matrices."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lora_cl.metrics import (
    adapt_at_k,
    bwt,
    forgetting,
    forgetting_per_domain,
    fwt,
    matrix_from_json,
    matrix_to_json,
    op,
    summarize,
    to_csv,
)

# Scores, higher is better. Row t = after training domain t; column i = evaluated domain i.
R = [
    [0.80, 0.30, 0.20],
    [0.82, 0.90, 0.40],
    [0.50, 0.70, 0.85],
]
BASE = [0.25, 0.20, 0.35]

# OP  = (0.50 + 0.70 + 0.85) / 3 = 2.05 / 3 = 0.683333...
# final - diagonal: (0.50 - 0.80, 0.70 - 0.90, 0.85 - 0.85) = (-0.30, -0.20, 0)
# BWT (TRACE, 1/T over all i)   = (-0.30 - 0.20 + 0) / 3 = -0.166666...
# BWT (GEM, 1/(T-1) over i<T-1) = (-0.30 - 0.20) / 2     = -0.25
# forgetting: domain 0: max(R00, R10) - R20 = max(0.80, 0.82) - 0.50 = 0.32
#             domain 1: max(R11)      - R21 = 0.90 - 0.70             = 0.20
#             mean = (0.32 + 0.20) / 2 = 0.26
# FWT: (R01 - b1 + R12 - b2) / 2 = ((0.30 - 0.20) + (0.40 - 0.35)) / 2 = (0.10 + 0.05) / 2 = 0.075
OP, BWT_TRACE, BWT_GEM = 2.05 / 3, -0.5 / 3, -0.25
FORGET_PER, FORGET, FWT = [0.32, 0.20], 0.26, 0.075

# Held-out losses (nats), lower is better.
L = [
    [2.0, 3.0, 3.5],
    [2.4, 1.8, 3.2],
    [2.6, 2.1, 1.5],
]
L_BASE = [2.5, 3.1, 3.4]
# OP = (2.6 + 2.1 + 1.5) / 3 = 6.2 / 3 = 2.0666... (mean final loss, in nats)
# oriented S = -L; final - diagonal = L_ii - L_2i: (2.0 - 2.6, 1.8 - 2.1, 0) = (-0.6, -0.3, 0)
# BWT (TRACE) = -0.9 / 3 = -0.3;  BWT (GEM) = -0.9 / 2 = -0.45
# forgetting: domain 0: L20 - min(L00, L10) = 2.6 - min(2.0, 2.4) = 0.6
#             domain 1: L21 - L11           = 2.1 - 1.8            = 0.3;  mean = 0.45
# FWT: (b1 - L01 + b2 - L12) / 2 = ((3.1 - 3.0) + (3.4 - 3.2)) / 2 = (0.1 + 0.2) / 2 = 0.15


def test_scores_by_hand():
    assert op(R) == pytest.approx(OP)
    assert bwt(R) == pytest.approx(BWT_TRACE)
    assert bwt(R, "trace") == pytest.approx(BWT_TRACE)
    assert bwt(R, "gem") == pytest.approx(BWT_GEM)
    assert forgetting_per_domain(R) == pytest.approx(FORGET_PER)
    assert forgetting(R) == pytest.approx(FORGET)
    assert fwt(R, BASE) == pytest.approx(FWT)


def test_summarize_labels_every_metric():
    s = summarize(np.array(R), base=BASE, names=["a", "b", "c"])
    assert s["T"] == 3 and s["domains"] == ["a", "b", "c"] and s["higher_is_better"]
    assert s["op"] == pytest.approx(OP)
    assert s["bwt_trace"] == pytest.approx(BWT_TRACE)
    assert s["bwt_gem"] == pytest.approx(BWT_GEM)
    assert s["forgetting"] == pytest.approx(FORGET)
    assert s["forgetting_per_domain"] == pytest.approx(FORGET_PER)
    assert s["fwt"] == pytest.approx(FWT)
    assert s["final"] == [0.50, 0.70, 0.85] and s["diagonal"] == [0.80, 0.90, 0.85]
    assert summarize(R)["fwt"] is None
    json.dumps(s)  # JSON-ready: plain floats and lists


def test_loss_matrix_keeps_worse_is_negative_bwt_positive_forgetting():
    s = summarize(L, base=L_BASE, higher_is_better=False)
    assert s["op"] == pytest.approx(6.2 / 3)
    assert s["bwt_trace"] == pytest.approx(-0.3)
    assert s["bwt_gem"] == pytest.approx(-0.45)
    assert s["forgetting_per_domain"] == pytest.approx([0.6, 0.3])
    assert s["forgetting"] == pytest.approx(0.45)
    assert s["fwt"] == pytest.approx(0.15)
    # Same as feeding the negated losses as scores (except OP, which stays in loss units).
    neg = summarize(-np.array(L), base=[-b for b in L_BASE])
    for key in ("bwt_trace", "bwt_gem", "forgetting", "fwt"):
        assert neg[key] == pytest.approx(s[key])


def test_forgetting_ignores_scores_before_a_domain_was_trained():
    # Domain 1 scored 0.99 before it was trained (t = 0); only t in [1, T-2] counts.
    scores = [[0.5, 0.99, 0.1], [0.5, 0.6, 0.1], [0.5, 0.4, 0.9]]
    assert forgetting_per_domain(scores) == pytest.approx([0.0, 0.2])


def test_single_domain():
    assert bwt([[0.7]]) == 0.0 and op([[0.7]]) == pytest.approx(0.7)
    s = summarize([[0.7]], base=[0.1])
    assert s["bwt_gem"] is None and s["forgetting"] is None and s["fwt"] is None
    assert s["forgetting_per_domain"] == []
    with pytest.raises(ValueError, match="at least 2 domains"):
        bwt([[0.7]], "gem")
    with pytest.raises(ValueError, match="at least 2 domains"):
        forgetting([[0.7]])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[1.0, 2.0], [3.0]], r"square .* row 1 has 1 entries"),
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], r"square .* row 0 has 3 entries"),
        (np.zeros((2, 3)), r"square T x T matrix, got shape \(2, 3\)"),
        (np.zeros(3), r"square T x T matrix, got shape \(3,\)"),
        ([], r"empty"),
        ([[1.0, 2.0], [float("nan"), 3.0]], r"non-finite .* \[1\]\[0\]"),
        ([[1.0, np.inf], [2.0, 3.0]], r"non-finite .* \[0\]\[1\]"),
        ([["a", "b"], ["c", "d"]], r"must hold numbers"),
        ([1.0, 2.0], r"list of rows; row 0 is 1.0"),
    ],
)
def test_bad_matrices_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        summarize(bad)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="convention must be 'trace' or 'gem'"):
        bwt(R, "lopez")
    with pytest.raises(ValueError, match=r"one score per domain \(T = 3\)"):
        fwt(R, [0.1, 0.2])
    with pytest.raises(ValueError, match="base has non-finite"):
        fwt(R, [0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="names must name the 3 domains"):
        summarize(R, names=["a"])


def test_adapt_at_k():
    curve = [3.0, 2.5, 2.1, 1.9, 1.7]  # curve[s] = loss after s steps on the new domain
    assert adapt_at_k(curve, 0) == 3.0
    assert adapt_at_k(curve, 3) == 1.9
    assert adapt_at_k(curve, 4, window=2) == pytest.approx((1.9 + 1.7) / 2)
    with pytest.raises(ValueError, match=r"outside the curve, which covers steps 0\.\.4"):
        adapt_at_k(curve, 5)
    with pytest.raises(ValueError, match="window"):
        adapt_at_k(curve, 1, window=3)


def test_csv_and_json_round_trip(tmp_path):
    path = tmp_path / "out" / "R.csv"
    to_csv(R, ["a", "b", "c"], path)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["after_training", "a", "b", "c"]
    assert [r[0] for r in rows[1:]] == ["a", "b", "c"]
    assert np.array([[float(x) for x in r[1:]] for r in rows[1:]]).tolist() == R
    with pytest.raises(ValueError, match="names must name the 3 domains"):
        to_csv(R, ["a", "b"], path)

    doc = matrix_from_json(matrix_to_json(R, ["a", "b", "c"], base=BASE))
    assert doc["R"].tolist() == R and doc["domains"] == ["a", "b", "c"] and doc["base"] == BASE
    assert doc["summary"]["bwt_gem"] == pytest.approx(BWT_GEM)
    with pytest.raises(ValueError, match="no 'R' key"):
        matrix_from_json("{}")
