"""Reports read from hand-written run directories: table values, plots, report.md, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from lora_cl import metrics as M
from lora_cl.report import (
    ReportError,
    fmt,
    load_run,
    results_table,
    write_comparison_report,
    write_run_report,
)

DOMAINS = ["kjv", "sqlite", "gpl"]
# loss after training domain t (rows) on domain i (columns); hand-checked metrics below
R = [[1.0, 2.5, 3.0],
     [1.2, 1.1, 2.8],
     [1.5, 1.3, 0.9]]
BASE = [2.0, 2.6, 3.1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _eval(losses: list[float]) -> list[dict]:
    return [{"loss": x, "ppl": math.exp(x), "n": 8, "tokens": 512} for x in losses]


def make_run(out: Path, label: str, rows: int = 3, routing: str = "decoupled", shift: float = 0.0) -> Path:
    """A run directory as the stream runner writes it, with ``rows`` of the 3 domains finished."""
    d = out / label
    d.mkdir(parents=True)
    Rs = [[x + shift for x in row] for row in R[:rows]]
    meta = {"label": label, "method": {"name": label, "routing": routing, "basis": "gradient"},
            "domains": DOMAINS, "sources": ["debian:" + n for n in DOMAINS], "model": "smollm2-135m",
            "seed": 0, "world_size": 1, "global_batch": 4, "steps_per_domain": [20, 20, 20],
            "versions": {"torch": "2.5.0"}, "git_commit": "abc123", "command": "lora-cl train x.yaml",
            "started": "2025-01-01T00:00:00+00:00", "finished": None if rows < 3 else "2025-01-01T01:00:00"}
    (d / "run.json").write_text(json.dumps(meta))
    (d / "base_eval.json").write_text(json.dumps({"domains": DOMAINS, "eval": _eval(BASE)}))

    def entry(metric: str, f) -> dict:
        Rm = [[f(x) for x in row] for row in Rs]
        b = [f(x) for x in BASE]
        s = M.summarize(Rm, b, False, DOMAINS) if rows == 3 else None
        return {"R": Rm, "base": b, "higher_is_better": False, "summary": s}

    doc = {"domains": DOMAINS, "primary": "loss",
           "metrics": {"loss": entry("loss", float), "ppl": entry("ppl", math.exp)}}
    (d / "matrix.json").write_text(json.dumps(doc))
    for i in range(rows):
        # per-domain Trainer step counts (1..20), as a fresh Trainer per domain logs them
        logs = [{"step": s, "loss": 3.0 - 0.05 * s, "learning_rate": 1e-4,
                 **({"projection/alpha": 0.5 - 0.01 * s, "projection/overlap": 0.1 * i} if i else {})}
                for s in range(2, 21, 2)]
        dm = {"domain": DOMAINS[i], "index": i, "steps": 20, "train_seconds": 60.0 * (i + 1),
              "eval_seconds": 5.0, "basis_seconds": 2.5, "bases_added": 32, "log_history": logs,
              "eval": _eval(Rs[i])}
        (d / "domains" / f"{i:02d}-{DOMAINS[i]}").mkdir(parents=True)
        (d / "domains" / f"{i:02d}-{DOMAINS[i]}" / "metrics.json").write_text(json.dumps(dm))
    return d


def _row(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.lstrip("| ").startswith(label))


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_table_values_are_the_summarized_matrix(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "ogp"))
    assert run.complete and run.finished == 3 and run.label == "ogp"
    s = M.summarize(R, BASE, False, DOMAINS)
    # hand-computed on S = -R: BWT_trace = (-0.5 - 0.2 + 0) / 3, forgetting = (0.5 + 0.2) / 2
    assert s["op"] == pytest.approx(3.7 / 3)
    assert s["bwt_trace"] == pytest.approx(-0.7 / 3) and s["bwt_gem"] == pytest.approx(-0.35)
    assert s["forgetting"] == pytest.approx(0.35) and s["fwt"] == pytest.approx(0.2)
    for key in ("op", "bwt_trace", "bwt_gem", "forgetting", "fwt"):
        assert run.summary()[key] == pytest.approx(s[key])

    table = results_table([run])
    header, row = table.splitlines()[0], _row(table, "ogp")
    assert "forgetting (loss, nats, lower better)" in header
    assert "OP (loss, nats, lower better)" in header and "BWT GEM 1/(T-1)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == ["ogp", "decoupled", "1.2333", "-0.2333", "-0.3500", "+0.3500", "+0.2000"]
    ppl_op = float(np.mean(np.exp(R[-1])))
    assert cells[7] == fmt("ppl", ppl_op) == f"{ppl_op:.2f}"  # final mean PPL, 2 decimals
    assert cells[8] == "6.0"  # (60 + 120 + 180) s of training


def test_plain_table_is_aligned(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "vanilla", routing="vanilla", shift=0.25), make_run(tmp_path, "ogp")]
    text = results_table(runs, markdown=False)
    lines = text.splitlines()
    assert "|" not in text and len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # every cell padded to its column
    assert set(lines[1]) <= {"-", " "}
    # numbers right-aligned: the OP column ends at the same offset on every row
    ends = {line.index(v) + len(v) for line, v in zip(lines[2:], ["1.4833", "1.2333"])}
    assert len(ends) == 1


def test_run_report_writes_plots_and_tables(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "ogp")
    report = write_run_report(run_dir)
    assert report == run_dir / "report.md"
    for name in ("matrix", "curves", "training"):
        _assert_png(run_dir / "plots" / f"{name}.png")
    text = report.read_text()
    for name in ("matrix", "curves", "training"):
        assert f"](plots/{name}.png)" in text
    assert "| after kjv | 1.0000 | 2.5000 | 3.0000 |" in text
    assert "| after gpl | 1.5000 | 1.3000 | 0.9000 |" in text
    assert "| base | 2.0000 | 2.6000 | 3.1000 |" in text
    assert "smollm2-135m" in text and "abc123" in text and "global batch" in text
    assert "| kjv | 2.0000 | – | 1.0000 | 1.5000 | +0.5000 |" in text  # per-domain row
    assert "How to read" in text and "BWT < 0" in text
    assert not list(run_dir.rglob(".tmp-*"))  # atomic writes left nothing behind


def test_partial_run_renders(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "ogp", rows=2)
    run = load_run(run_dir)
    assert not run.complete and run.finished == 2 and run.summary() is None
    table = results_table([run])
    row = _row(table, "ogp")
    assert "ogp (2/3 domains)" in row
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:7] == ["–"] * 5
    text = write_run_report(run_dir).read_text()
    assert "2/3" in text and "| after gpl | pending | pending | pending |" in text
    _assert_png(run_dir / "plots" / "matrix.png")


def test_comparison_report_lists_every_run(tmp_path: Path) -> None:
    make_run(tmp_path, "vanilla", routing="vanilla", shift=0.25)
    make_run(tmp_path, "ogp")
    make_run(tmp_path, "unlisted")
    (tmp_path / "compare.json").write_text(json.dumps({"runs": ["vanilla", "ogp"]}))
    report = write_comparison_report(tmp_path)
    text = report.read_text()
    assert "| vanilla | vanilla |" in text and "| ogp | decoupled |" in text
    assert "unlisted" not in text
    assert "[ogp](ogp/report.md)" in text
    for name in ("comparison", "forgetting"):
        assert f"](plots/{name}.png)" in text
        _assert_png(tmp_path / "plots" / f"{name}.png")
    assert (tmp_path / "vanilla" / "report.md").is_file() and (tmp_path / "ogp" / "plots").is_dir()
    assert not (tmp_path / "unlisted" / "report.md").exists()


def test_comparison_without_compare_json_finds_runs(tmp_path: Path) -> None:
    make_run(tmp_path, "vanilla", rows=2)
    make_run(tmp_path, "ogp")
    (tmp_path / "notes").mkdir()
    text = write_comparison_report(tmp_path).read_text()
    assert "vanilla (2/3 domains)" in text and "| ogp |" in text


def test_missing_run_json_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no run\.json.*lora-cl train"):
        load_run(tmp_path)


def test_corrupt_matrix_names_the_file(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "ogp")
    (run_dir / "matrix.json").write_text('{"domains": ["kjv", ')
    with pytest.raises(ReportError, match=r"matrix\.json: corrupt"):
        load_run(run_dir)
    (run_dir / "matrix.json").write_text(json.dumps({"domains": DOMAINS, "primary": "loss",
                                                     "metrics": {"loss": {"R": [[1.0, 2.0]]}}}))
    with pytest.raises(ReportError, match=r"matrix\.json: .*row 0 must hold 3 scores"):
        load_run(run_dir)


def test_reads_what_the_stream_writes_with_exact_match(tmp_path: Path) -> None:
    """matrix.json built by the runner's own writer; EM is higher-better, so signs flip back."""
    from lora_cl.trainer.run_files import rebuild_matrices

    em = [[0.5, 0.1, 0.0], [0.4, 0.6, 0.1], [0.3, 0.5, 0.7]]
    run_dir = make_run(tmp_path, "ogp")
    base = _eval(BASE)
    for e, x in zip(base, [0.1, 0.0, 0.0]):
        e["exact_match"] = x
    (run_dir / "base_eval.json").write_text(json.dumps({"domains": DOMAINS, "eval": base}))
    for i, path in enumerate(sorted(run_dir.glob("domains/*/metrics.json"))):
        dm = json.loads(path.read_text())
        for e, x in zip(dm["eval"], em[i]):
            e["exact_match"] = x
        path.write_text(json.dumps(dm))
    rebuild_matrices(run_dir, DOMAINS, "exact_match")

    run = load_run(run_dir)
    assert run.primary == "exact_match" and run.higher_is_better()
    s = M.summarize(em, [0.1, 0.0, 0.0], True, DOMAINS)
    assert s["forgetting"] == pytest.approx(0.15) and s["bwt_gem"] == pytest.approx(-0.15)
    table = results_table([run])
    assert "OP (EM, higher better)" in table and "forgetting (EM, lower better)" in table
    assert "final mean loss, nats, lower better" in table
    cells = [c.strip() for c in _row(table, "ogp").strip("|").split("|")]
    assert cells[2:7] == [fmt("exact_match", s["op"]), "-0.1000", "-0.1500", "+0.1500", "+0.1000"]
    write_run_report(run)
    _assert_png(run_dir / "plots" / "matrix.png")
