"""lora-cl reproduce: the quick grid end to end on the tiny model, cell caching, and the CI maths."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from lora_cl.cli import main
from lora_cl.reproduce import default_settings, part_cells
from lora_cl.reproduce.grid import config_hash
from lora_cl.reproduce.stats import mean_ci, paired, t_ppf


def _reproduce(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--quick", "--model", "tiny", "--no-progress", *args])
    assert exit_info.value.code == 0


def test_quick_grid_runs_parts_1_and_2_then_skips_finished_cells(tmp_path, lora_cl_cache, capsys):
    cache, docs = tmp_path / "cache", tmp_path / "docs"
    common = ("--only", "1,2", "--methods", "vanilla,ogp", "--cache", str(cache), "--docs", str(docs))
    _reproduce(*common)
    settings = default_settings(quick=True, model="tiny")
    cells = part_cells(2, settings, ("vanilla", "ogp"))
    assert [c.method.label for c in cells] == ["vanilla", "ogp"] and all(c.seed == 0 for c in cells)
    for cell in cells:
        run_dir = cell.run_dir(cache)
        assert run_dir.parent.parent.name == "lm8" and run_dir.name == f"{cell.method.label}-s0"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["complete"] and summary["T"] == 3
        assert math.isfinite(summary["metrics"]["loss"]["forgetting"])
    synthetic = next(cache.glob("prop1/*/synthetic.json"))
    real = json.loads(next(cache.glob("prop1/*/real-s0.json")).read_text())
    assert [p["alpha"] for p in real["points"]] == pytest.approx([0.1 * k for k in range(1, 9)])
    assert all(p["groups"]["all"]["lr_ratio"] > 1 for p in real["points"])  # shared inflates eta_U

    text = (docs / "reproduction.md").read_text()
    assert "## Part 1" in text and "## Part 7" in text and (docs / "reproduction" / "prop1.png").is_file()
    assert (docs / "reproduction" / "part2-lm8.png").is_file()
    assert "partial: 2 of 11 cells finished" in text      # the other 9 part-2 methods
    assert "not run yet (0 of 4 cells)" in text            # e.g. part 4
    assert "Methods: vanilla, gpm, ogp, replay-shared; gpm is the shared-projection baseline" in text
    assert "(part 2 has no finished shared method on lm8 yet)" in text  # the reason is read from cells
    # the compute table counts what is finished: both part 1 results, 2 of part 2's 11 cells
    assert "| 1 | prop1 | 2 | 2 |" in text and "| 2 | lm8 | 11 | 2 |" in text
    assert "from earlier parts) | 0 |" in text             # part 6 shares adam-nscl, ogp-fixed
    assert "lora-cl reproduce --only 2 --quick --model tiny" in text
    run = json.loads((cells[0].run_dir(cache) / "run.json").read_text())
    assert run["device"].endswith("cores") or "CUDA" in run["device"]
    assert f"ran (each cell's run.json): {run['device']}, torch {run['versions']['torch']}: 2 cells" in text
    # measured values come from the cells: vanilla's forgetting appears in the table
    vanilla = json.loads((cells[0].run_dir(cache) / "summary.json").read_text())
    assert f"{vanilla['metrics']['loss']['forgetting']:.4g}" in text

    watched = [synthetic, *(c.run_dir(cache) / "summary.json" for c in cells)]
    stamps = {p: p.stat().st_mtime_ns for p in watched}
    capsys.readouterr()
    _reproduce(*common)
    out = capsys.readouterr()
    assert "0 cells trained, 2 cached" in out.out and "0 part 1 results written" in out.out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps   # nothing retrained or rewritten


def test_report_only_on_an_empty_cache_says_what_is_missing(tmp_path):
    _reproduce("--report", "--cache", str(tmp_path / "none"), "--docs", str(tmp_path))
    text = (tmp_path / "reproduction.md").read_text()
    assert "not run yet (0 of 11 cells)" in text and "not run yet (0 of 2 cells)" in text
    rows = re.findall(r"^\| (\d) \| [\w-]+ \| [^|]+ \| (\d+) \| ([^|]+) \| ([^|]+) \|$", text, re.M)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert all(done == "0" and est_all == est_left for _, done, est_all, est_left in rows)  # nothing run
    assert "not testable here" in text
    part7_rows = re.findall(r"^\| .* \| not testable here: [^|]+ \|$", text.split("## Part 7")[1], re.M)
    assert f"of the paper's {len(part7_rows)} claims in [part 7](" in text
    assert f"), {len(part7_rows)} not testable here." in text          # nothing measured, nothing claimed
    # the hint trains the cells this report reads: its settings, cache and docs folder, not the defaults
    assert (f"(train them: `lora-cl reproduce --only 2 --methods vanilla,adam-nscl --only-seeds 0 --quick "
            f"--model tiny --cache {tmp_path / 'none'} --docs {tmp_path}`)") in text


def test_config_hash_ignores_method_and_seed_but_not_lr():
    s = default_settings(quick=True, model="tiny")
    cells = part_cells(6, s)
    by = {c.method.label: c.cfg for c in cells}
    assert by["adam-nscl"] == by["ogp-fixed"] == by["ogp-fixed-v_only"]
    assert by["adam-nscl-lr-matched"] != by["adam-nscl"]
    assert config_hash("lm8", cells[0].method, s) != config_hash("lm16", cells[0].method, default_settings())


def test_config_hash_keeps_old_cells_at_default_betas_and_changes_with_beta2():
    from dataclasses import replace

    from lora_cl.reproduce.grid import recipe_dict

    s = default_settings()
    ogp = part_cells(2, s)[0].method
    assert "adam_beta2" not in recipe_dict("lm8", ogp, 0, s, Path("."))["training"]
    fast = replace(s, adam_beta2=0.99)
    assert recipe_dict("lm8", ogp, 0, fast, Path("."))["training"]["adam_beta2"] == 0.99
    assert config_hash("lm8", ogp, fast) != config_hash("lm8", ogp, s)


def test_mean_ci_and_paired_on_hand_computed_values():
    # x = 1, 2, 3, 4, 5: mean 3, s = sqrt(2.5), t_{4, 0.975} = 2.776445
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert ci.mean == pytest.approx(3) and ci.std == pytest.approx(math.sqrt(2.5))
    assert ci.lo == pytest.approx(3 - half, abs=1e-5) and ci.hi == pytest.approx(3 + half, abs=1e-5)
    assert t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert t_ppf(0.975, 1) == pytest.approx(12.706205, abs=1e-4)
    single = mean_ci([0.7])
    assert single.mean == 0.7 and single.lo is None and not single.excludes_zero()
    # paired: a - b = 1, 2, 3 on common seeds {0, 1, 2} (seed 3 only in a); t = 2 / (1 / sqrt 3);
    # df = 2 has a closed-form CDF, so the two-sided p = 1 - t / sqrt(2 + t^2)
    p = paired({0: 2.0, 1: 4.0, 2: 6.0, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert p.seeds == [0, 1, 2] and p.diffs == [1.0, 2.0, 3.0]
    t = 2 * math.sqrt(3)
    assert p.ci.mean == pytest.approx(2.0) and not p.ci.excludes_zero()   # CI [-0.484, 4.484]
    assert p.ci.lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert p.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-6)
    assert paired({0: 1.0, 1: 1.5}, {0: 0.0, 1: 0.0}).ci.excludes_zero() is False
    assert paired({0: 3.0, 1: 3.1, 2: 2.9}, {0: 0.0, 1: 0.0, 2: 0.0}).ci.excludes_zero()


@pytest.mark.slow
def test_parallel_script_splits_methods_over_workers_sharing_one_cache(tmp_path, lora_cl_cache):
    """benchmarks/reproduce_parallel.sh: two workers, one method each, cells in one cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "reproduce_parallel.sh"), "-w", "2", "-t", "600",
                           "-p", "2", "-c", str(cache), "-l", str(logs), "-m", "vanilla,ogp-fixed", "--",
                           "--quick", "--model", "tiny"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worker 0: vanilla" in proc.stdout and "worker 1: ogp-fixed" in proc.stdout
    for method in ("vanilla", "ogp-fixed"):
        summary = next(cache.glob(f"lm8/*/{method}-s0/summary.json"))
        assert json.loads(summary.read_text())["complete"]
    assert sorted(p.name for p in logs.glob("worker-*.log")) == ["worker-0.log", "worker-1.log"]


def _pool_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_pool.py"
    spec = importlib.util.spec_from_file_location("reproduce_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pool_plans_seed_major_longest_first_and_skips_finished_cells(tmp_path):
    pool = _pool_module()
    settings = default_settings(quick=True, model="tiny", seeds=(0, 1))
    jobs = pool.plan_jobs([2, 6], tmp_path, settings)
    assert [j["seed"] for j in jobs] == sorted(j["seed"] for j in jobs)       # every seed 0 first
    methods_s0 = [j["method"] for j in jobs if j["seed"] == 0]
    # part 6's adam-nscl and ogp-fixed are part 2's cells: planned once
    assert len(methods_s0) == len(set(methods_s0)) == 14                      # 11 + 3 of part 6 alone
    assert all(a["estimate_s"] >= b["estimate_s"] for a, b in zip(jobs, jobs[1:]) if a["seed"] == b["seed"])
    done = part_cells(2, replace(settings, seeds=(1,)), ("vanilla",))[0].run_dir(tmp_path)
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"complete": True}))
    left = pool.plan_jobs([2, 6], tmp_path, settings)
    assert len(left) == len(jobs) - 1 and not any(j["method"] == "vanilla" and j["seed"] == 1 for j in left)
    # longest first over all seeds: part 5's Q/A cells (generation in the eval) before part 2's
    real = default_settings(quick=True, seeds=(0, 1))  # planning only: nothing is loaded
    by_seed = pool.plan_jobs([2, 5], tmp_path, real)
    longest = pool.plan_jobs([2, 5], tmp_path, real, order="longest")
    assert sorted(map(str, longest)) == sorted(map(str, by_seed)) and longest != by_seed
    assert all(a["estimate_s"] >= b["estimate_s"] for a, b in zip(longest, longest[1:]))
    assert longest[0]["estimate_s"] > longest[-1]["estimate_s"] and longest[0]["seed"] == 0
    assert [j["part"] for j in longest[:2]] == [5, 5] and [j["seed"] for j in longest[:2]] == [0, 0]
    with pytest.raises(ValueError, match="order must be"):
        pool.plan_jobs([2], tmp_path, settings, order="random")


@pytest.mark.slow
def test_pool_trains_one_process_per_cell_and_stops_at_the_deadline(tmp_path, lora_cl_cache, capsys):
    pool = _pool_module()
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    common = ["--parts", "2", "--methods", "vanilla", "--quick", "--model", "tiny", "--seeds", "2",
              "--cache", str(cache)]
    # a deadline that no cell can meet: the job is stopped, its cell left unfinished, rc 1
    assert pool.main([*common, "--workers", "1", "--deadline", "1", "--logs", str(tmp_path / "cut"),
                      "--pack", str(tmp_path / "cut.tar.gz")]) == 1
    import tarfile

    with tarfile.open(tmp_path / "cut.tar.gz") as tar:
        assert tar.getnames() == []                              # nothing finished: nothing packed
    cut = json.loads((tmp_path / "cut" / "pool.json").read_text())
    assert [j["outcome"] for j in cut] == ["stopped at deadline", "not started"]
    assert not list(cache.glob("lm8/*/vanilla-s*/summary.json")) or not any(
        json.loads(p.read_text()).get("complete") for p in cache.glob("lm8/*/vanilla-s*/summary.json"))
    # two workers, one cell each (seeds 0 and 1 of vanilla), both complete and packed
    packed = tmp_path / "out" / "cells.tar.gz"
    assert pool.main([*common, "--workers", "2", "--deadline", "600", "--logs", str(logs),
                      "--pack", str(packed)]) == 0
    done = json.loads((logs / "pool.json").read_text())
    assert not list(tmp_path.rglob("reproduction.md"))          # workers leave the report to --report
    assert sorted((j["seed"], j["outcome"]) for j in done) == [(0, "ok"), (1, "ok")]
    for seed in (0, 1):
        summary = next(cache.glob(f"lm8/*/vanilla-s{seed}/summary.json"))
        assert json.loads(summary.read_text())["complete"]
        run = json.loads((summary.parent / "run.json").read_text())
        assert f"--only-seeds {seed}" in run["command"]        # one process per cell
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert {n.split("/")[-2] for n in names if n.endswith("/summary.json")} == {"vanilla-s0", "vanilla-s1"}
    assert all(n.startswith("lm8/") and n.endswith((".json", ".csv")) for n in names)
    on_disk = {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and "vanilla-s" in str(p)}
    assert set(names) == on_disk                                # a finished cell: pruned to JSON/CSV
    capsys.readouterr()
    assert pool.main([*common, "--dry-run"]) == 0
    assert "0 unfinished cells" in capsys.readouterr().out


def _refused(tmp_path, capsys, *args: str) -> str:
    """Run a quick tiny ``lora-cl reproduce`` with ``args``, assert it exits 2, return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--quick", "--model", "tiny", *args,
              "--cache", str(tmp_path), "--docs", str(tmp_path)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_only_seeds_outside_the_seed_range_is_refused(tmp_path, capsys):
    err = _refused(tmp_path, capsys, "--only", "2", "--only-seeds", "3")
    assert "--only-seeds takes seeds from [0]" in err and "--seeds" in err


def test_methods_not_in_the_chosen_parts_are_refused_with_the_valid_names(tmp_path, capsys):
    """A method of another part (adam-nscl is not a part-4 method) must not train 0 cells and exit 0."""
    err = _refused(tmp_path, capsys, "--only", "4", "--methods", "gpm,adam-nscl")
    assert "--methods adam-nscl is not a method of part(s) 4" in err
    assert "part 4: vanilla, gpm, ogp, replay-shared" in err
    assert not list(tmp_path.iterdir())                       # nothing trained, nothing written
    assert "these parts train no cells" in _refused(tmp_path, capsys, "--only", "1", "--methods", "ogp")
    pool = _pool_module()                                     # the pool refuses the same names
    with pytest.raises(SystemExit) as exit_info:
        pool.main(["--parts", "4", "--methods", "adam-nscl", "--quick", "--model", "tiny",
                   "--cache", str(tmp_path), "--dry-run"])
    assert exit_info.value.code == 2
    assert "part 4: vanilla, gpm, ogp, replay-shared" in capsys.readouterr().err


def test_qa_part_reports_both_bwt_conventions_and_the_per_task_r_matrix(tmp_path):
    """Part 5's section from finished Q/A cells: BWT (TRACE, GEM) columns, the R matrix's diagonal
    and last row per method (mean over seeds, hand-checked) and a heatmap."""
    from lora_cl.reproduce.collect import mean_matrix
    from lora_cl.reproduce.doc import Report

    settings = default_settings()
    cells = [c for c in part_cells(5, replace(settings, seeds=(0, 1))) if c.method.label == "vanilla"]
    T = 8
    for cell in cells:
        run_dir = cell.run_dir(tmp_path)
        run_dir.mkdir(parents=True)
        k = cell.seed
        R = [[round(0.1 * ((i + j + k) % 10), 2) for j in range(T)] for i in range(T)]
        em = {"op": 0.3 + k / 10, "forgetting": 0.2, "bwt_trace": -0.1 - k / 10, "bwt_gem": -0.05 - k / 10}
        (run_dir / "summary.json").write_text(json.dumps(
            {"complete": True, "T": T, "metrics": {"exact_match": em, "loss": {"forgetting": 0.5}}}))
        (run_dir / "matrix.json").write_text(json.dumps({"metrics": {"exact_match": {"R": R}}}))
    report = Report(tmp_path, settings, tmp_path / "docs")
    mean, n = mean_matrix(report.results, "qa8", "vanilla", "exact_match")
    assert n == 2 and mean[0][0] == pytest.approx((0.0 + 0.1) / 2)
    assert mean[7][7] == pytest.approx((0.4 + 0.5) / 2)
    text = report.stream_part(5)
    assert "BWT (EM, TRACE)" in text and "BWT (EM, GEM)" in text
    assert "-0.15 [" in text and "-0.1 [" in text                  # mean BWT over the two seeds
    # R_k[i][j] = 0.1 ((i + j + k) mod 10); diagonal and last row averaged over k = 0, 1 by hand
    assert ("| vanilla | just learnt (`R[j][j]`) | 2 | 0.05 | 0.25 | 0.45 | 0.65 | 0.85 | 0.05 | 0.25 | "
            "0.45 |" in text)
    assert ("| vanilla | after the last task (`R[T][j]`) | 2 | 0.75 | 0.85 | 0.45 | 0.05 | 0.15 | 0.25 | "
            "0.35 | 0.45 |" in text)
    assert (tmp_path / "docs" / "reproduction" / "part5-qa8-R-exact_match.png").is_file()
    assert "held-out loss" not in text              # these cells hold no loss matrix


def test_part6_relates_forgetting_to_the_logged_old_direction_lr(tmp_path):
    """R_eta per cell = mean logged probe/old_direction_lr over ogp-fixed's (same seed); the table,
    Pearson's r (log R_eta vs forgetting, checked by hand) and the scatter plot."""
    from lora_cl.reproduce.collect import pearson
    from lora_cl.reproduce.doc import Report
    from lora_cl.reproduce.grid import METHODS, recipe_dict

    settings = default_settings()
    assert recipe_dict("lm8", METHODS["ogp-fixed-v_scaled"], 0, settings, tmp_path)["training"]["lr"] == (
        2 * settings.lr)
    eta = {"ogp-fixed": 1.0, "adam-nscl": 3.0, "adam-nscl-lr-matched": 1.5}
    forget = {"ogp-fixed": 0.10, "adam-nscl": 0.14, "adam-nscl-lr-matched": 0.12}
    for cell in part_cells(6, replace(settings, seeds=(0, 1))):
        if cell.method.label not in eta:
            continue
        run_dir = cell.run_dir(tmp_path)
        (run_dir / "domains" / "01-kjv").mkdir(parents=True)
        scale = 1e-3 * (1 + cell.seed)              # seeds differ in absolute LR, not in the ratio
        logs = [{"probe/old_direction_lr": scale * eta[cell.method.label] * f} for f in (0.5, 1.5)]
        (run_dir / "domains" / "01-kjv" / "metrics.json").write_text(json.dumps({"log_history": logs}))
        loss = {"forgetting": forget[cell.method.label] + cell.seed / 100}
        (run_dir / "summary.json").write_text(json.dumps({"complete": True, "metrics": {"loss": loss}}))
    text = Report(tmp_path, settings, tmp_path / "docs")._eta_section(6, "lm8")
    assert "| adam-nscl | 2 | 3 [3, 3] | 0.145 [" in text and "| ogp-fixed | 2 | 1 [1, 1] |" in text
    xs = [math.log(eta[m]) for m in ("adam-nscl", "adam-nscl-lr-matched", "ogp-fixed") for _ in (0, 1)]
    ys = [forget[m] + s / 100 for m in ("adam-nscl", "adam-nscl-lr-matched", "ogp-fixed") for s in (0, 1)]
    r = pearson(xs, ys)
    assert 0.8 < r < 1 and f"over 6 cells: {r:.3f}" in text
    same_lr = pearson(xs[:2] + xs[4:], ys[:2] + ys[4:])       # without adam-nscl-lr-matched
    assert f"(routing alone differs): r = {same_lr:.3f} over 4 cells" in text
    assert (tmp_path / "docs" / "reproduction" / "part6-lm8-eta.png").is_file()
    assert pearson([1, 2], [3, 4]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
    legend = Report(tmp_path, settings, tmp_path / "docs")._moments_legend(6)   # from the routing table
    assert "| ogp-fixed-v_only | v_only | `g` | `g~^2` | lr |" in legend
    assert "| adam-nscl-lr-matched | shared | `g~` | `g~^2` | lr x 0.5 |" in legend
    assert "| ogp-fixed-v_scaled | decoupled | `g~` | `g^2` | lr x 2 (= v on (1 - alpha)^2 g^2" in legend


@pytest.mark.parametrize(("levels", "verdict"), [
    ({"adam-nscl": (0.7, 0.9)}, "has measurably higher overlap"),
    ({"adam-nscl": (0.7, 0.5)}, "measurably *lower* overlap"),
    ({"adam-nscl": (0.7, 0.7)}, "not measurably higher"),
    # gpm's level is far above adam-nscl's on both streams: pooled over methods the two streams'
    # intervals overlap, but cell for cell (same method and seed) the built stream is higher
    ({"adam-nscl": (0.70, 0.80), "gpm": (0.95, 1.00)}, "has measurably higher overlap"),
])
def test_part3_says_whether_the_high_overlap_stream_has_higher_overlap(tmp_path, levels, verdict):
    from lora_cl.reproduce.doc import Report

    settings = default_settings()
    for method, by_part in levels.items():
        for part, level in zip((2, 3), by_part):
            for cell in part_cells(part, replace(settings, seeds=(0, 1)), (method,)):
                run_dir = cell.run_dir(tmp_path)
                for d, name in enumerate(("00-a", "01-b")):
                    logs = [{"projection/overlap": level + 0.01 * cell.seed + 0.001 * k} for k in range(3)]
                    (run_dir / "domains" / name).mkdir(parents=True)
                    (run_dir / "domains" / name / "metrics.json").write_text(
                        json.dumps({"log_history": logs * d}))
                (run_dir / "summary.json").write_text(json.dumps({"complete": True}))
    text = Report(tmp_path, settings, tmp_path / "docs").part3_overlap()
    n = 2 * len(levels)
    assert f"({n} cells)" in text and f"over {n} pairs" in text and verdict in text
    if len(levels) == 2:   # the pooled intervals overlap: the old comparison would have said "not"
        # cell means 0.701, 0.711, 0.951, 0.961 and 0.801, 0.811, 1.001, 1.011 (t_3 = 3.182)
        assert "lm8 0.831 [0.6011, 1.061] (4 cells), lm8-kjv 0.906 [0.722, 1.09] (4 cells)" in text
        assert "lm8-kjv - lm8 = 0.075 [0.02907, 0.1209] over 4 pairs" in text  # diffs .1, .1, .05, .05


def test_part2_shows_the_replay_buffer_loss_beside_the_held_out_loss_of_earlier_domains(tmp_path):
    """The replay table: buffer size and loss at the last log (mean over seeds), the final held-out
    loss of domains 1..T-1 and the base model's, hand-computed; vanilla is the reference row."""
    from lora_cl.reproduce.doc import Report

    settings = default_settings()
    T = 3
    for cell in part_cells(2, replace(settings, seeds=(0, 1)), ("vanilla", "replay-shared")):
        run_dir = cell.run_dir(tmp_path)
        k, replay = cell.seed, cell.method.label == "replay-shared"
        for d in range(T):
            (run_dir / "domains" / f"0{d}-x").mkdir(parents=True)
            logs = [{"loss": 3.0}]
            if replay and d:       # the buffer grows by 2 examples a domain; its loss falls
                logs = [{"loss": 3.0, "cl/replay_loss": 2.0 - d / 2 - k / 10, "cl/replay_examples": 2.0 * d},
                        {"train_loss": 3.0, "cl/replay_loss": 0.0, "cl/replay_examples": 2.0 * d + 2}]
            (run_dir / "domains" / f"0{d}-x" / "metrics.json").write_text(json.dumps({"log_history": logs}))
        last = [5.0 + k, 4.0, 9.9] if replay else [3.5, 3.0, 9.9]
        R = [[0.0] * T, [0.0] * T, last]
        (run_dir / "matrix.json").write_text(json.dumps(
            {"metrics": {"loss": {"R": R, "base": [3.7, 3.3, 9.0]}}}))
        (run_dir / "summary.json").write_text(json.dumps(
            {"complete": True, "T": T, "metrics": {"loss": {"forgetting": 0.5}}}))
    text = Report(tmp_path, settings, tmp_path / "docs").stream_part(2)
    assert "Replay buffer (0.5% of each earlier domain's training examples, mixed at rho = 0.5)" in text
    # buffer loss: 2 - 2/2 - k/10 = 1.0, 0.9; held-out: (5 + k + 4) / 2 = 4.5, 5.0; base (3.7 + 3.3) / 2
    assert "| replay-shared | 2 | 4 | 0.95 [" in text and "| 4.75 [" in text
    assert "| vanilla | 2 | – | – | 3.25 [3.25, 3.25] | 3.5 |" in text
    assert "Replay buffer" not in Report(tmp_path, settings, tmp_path / "docs").stream_part(6)


def test_stream_part_states_how_many_passes_over_each_training_slice_the_steps_make(tmp_path):
    """The Trainer's epoch at each domain's last log, median over cells, smallest and largest named."""
    from lora_cl.reproduce.doc import Report

    settings = default_settings()
    for cell in part_cells(2, replace(settings, seeds=(0, 1)), ("vanilla",)):
        run_dir = cell.run_dir(tmp_path)
        for d, (name, epoch) in enumerate([("austen", 0.41), ("gcide", 0.33), ("licenses", 0.45)]):
            (run_dir / "domains" / f"0{d}-{name}").mkdir(parents=True)
            logs = [{"loss": 3.0, "epoch": epoch / 2}, {"train_loss": 3.0, "epoch": epoch + cell.seed / 50},
                    {"cl/bases_added": 1}]     # the end-of-domain entry without an epoch is skipped
            (run_dir / "domains" / f"0{d}-{name}" / "metrics.json").write_text(
                json.dumps({"domain": name, "log_history": logs}))
        (run_dir / "summary.json").write_text(json.dumps({"complete": True, "T": 3, "metrics": {}}))
    text = Report(tmp_path, settings, tmp_path / "docs").stream_part(2)
    # medians over seeds 0 and 1: gcide (0.33 + 0.35) / 2, licenses (0.45 + 0.47) / 2
    assert ("Data per domain: 40 steps of 4 sequences of at most 128 tokens make 0.34 (gcide) to "
            "0.46 (licenses) passes over the domain's training slice") in text
    assert "Data per domain" not in Report(tmp_path / "none", settings, tmp_path / "docs").stream_part(2)


def _lm_cell(run_dir, forgetting: float, ppl: float, train_loss: float, epoch: float) -> None:
    """A finished hand-built lm8 cell: its summary and one domain log with an epoch."""
    (run_dir / "domains" / "00-austen").mkdir(parents=True)
    (run_dir / "domains" / "00-austen" / "metrics.json").write_text(json.dumps(
        {"domain": "austen", "log_history": [{"train_loss": train_loss, "epoch": epoch}]}))
    (run_dir / "summary.json").write_text(json.dumps({"complete": True, "T": 8, "metrics": {
        "loss": {"forgetting": forgetting}, "ppl": {"op": ppl}},
        "plasticity": {"final_train_loss": [train_loss]}}))


def test_larger_grid_is_reported_beside_part_2_at_both_lengths(tmp_path):
    """Part 2's section is followed by the larger grid read from ``<cache>-longer``: each method and
    each paired difference at 40 and 120 steps (hand-computed), whether an order flips, the data it
    covers, its row in the compute table and a plot; nothing but "not run yet" before its cells."""
    from lora_cl.reproduce.doc import Report
    from lora_cl.reproduce.grid import longer_cache, longer_settings

    settings, cache = default_settings(), tmp_path / "cells"
    assert longer_cache(cache) == tmp_path / "cells-longer" and longer_settings(settings).steps == 120
    empty = Report(cache, settings, tmp_path / "docs")
    assert "not run yet (0 of 9 cells)" in empty.longer_section()
    assert "| 2, larger grid (120 steps per domain) | lm8 | 9 | 0 |" in empty.header()
    short = {"vanilla": 0.15, "gpm": 0.12, "ogp": 0.14}
    long_ = {"vanilla": 0.44, "gpm": 0.37, "ogp": 0.46}       # ogp now forgets more than vanilla
    two = replace(settings, seeds=(0, 1))
    for grid, values, root in ((two, short, cache), (longer_settings(two), long_, longer_cache(cache))):
        for cell in part_cells(2, grid, ("vanilla", "gpm", "ogp")):
            f = values[cell.method.label] + cell.seed / 100
            _lm_cell(cell.run_dir(root), f, 27 + 10 * f, 3.0 - f, 0.3 if root == cache else 0.9)
    report = Report(cache, settings, tmp_path / "docs")
    text = report.longer_section()
    assert "Command: `lora-cl reproduce --longer --cache " + str(cache) in text
    assert "partial: 6 of 9 cells finished" in text
    assert "120 steps of 4 sequences of at most 128 tokens make 0.90 (austen)" in text
    # forgetting 0.15, 0.16 -> 0.155 and 0.44, 0.45 -> 0.445: ratio 2.87; PPL 27 + 10 f
    assert "| vanilla | 2 / 2 | 0.155 [" in text and "| 0.445 [" in text and "| 2.87 | 28.55 [" in text
    assert "| 31.45 [" in text
    # paired: the per-seed differences are constant, so the CI is a point and p = 0
    assert "| vanilla - ogp | 2 | 0.01 [0.01, 0.01] | 0 | 2 | -0.02 [-0.02, -0.02] | 0 | flips |" in text
    assert "| gpm - ogp | 2 | -0.02 [-0.02, -0.02] | 0 | 2 | -0.09 [-0.09, -0.09] | 0 | kept |" in text
    assert (tmp_path / "docs" / "reproduction" / "part2-lm8-longer.png").is_file()
    assert "| 2, larger grid (120 steps per domain) | lm8 | 9 | 6 |" in report.header()
    render = report.render()     # placed right after part 2, before part 3
    assert render.index("## Part 2") < render.index("### The larger grid: 120") < render.index("## Part 3")


def test_longer_flag_trains_the_larger_grid_into_its_own_cache(tmp_path, lora_cl_cache, capsys):
    cache, docs = tmp_path / "cells", tmp_path / "docs"
    _reproduce("--longer", "--methods", "vanilla", "--cache", str(cache), "--docs", str(docs))
    assert not cache.exists()                            # the main grid is untouched
    (run_dir,) = (tmp_path / "cells-longer").glob("lm8/*/vanilla-s0")
    steps = json.loads((run_dir / "run.json").read_text())["steps_per_domain"]
    assert steps == [3 * default_settings(quick=True, model="tiny").steps] * 3
    text = (docs / "reproduction.md").read_text()
    assert "### The larger grid: 9 steps per domain" in text and "partial: 1 of 3 cells finished" in text
    err = _refused(tmp_path, capsys, "--longer", "--methods", "adam-nscl")
    assert "--longer trains vanilla, gpm, ogp; adam-nscl is not in the larger grid" in err
    assert "drop --only 3" in _refused(tmp_path, capsys, "--longer", "--only", "3")


@pytest.mark.parametrize(("matched", "verdict"), [
    ({0: 0.136, 1: 0.138}, "reproduced"),        # gap 0.145 - 0.135; closes (0.145 - 0.137) / 0.01 = 80%
    ({0: 0.040, 1: 0.050}, "it overshoots"),     # closes 1000%
    ({0: 0.139, 1: 0.149}, "closed share outside 80% +- 20%"),   # closes 10%
])
def test_lr_matching_claim_on_hand_built_cells(matched, verdict):
    """The share of the adam-nscl - ogp-fixed gap that lr matching closes, over paired seeds; an
    overshoot names the final train losses (the lower LR learns less everywhere)."""
    from lora_cl.reproduce.claims import lr_matching_claim
    from lora_cl.reproduce.collect import CellResult
    from lora_cl.reproduce.grid import METHODS, Cell

    forget = {"adam-nscl": {0: 0.140, 1: 0.150}, "ogp-fixed": {0: 0.130, 1: 0.140},
              "adam-nscl-lr-matched": matched}
    train = {"adam-nscl": 3.1, "ogp-fixed": 3.1, "adam-nscl-lr-matched": 3.3}
    results = [CellResult(Cell("lm8", METHODS[m], seed, "x"),
                          {"metrics": {"loss": {"forgetting": f}},
                           "plasticity": {"final_train_loss": [train[m], train[m]]}}, 1.0)
               for m, by_seed in forget.items() for seed, f in by_seed.items()]
    claim = lr_matching_claim(results)
    assert claim.measured.startswith("gap 0.01 nats") and "(2 seeds)" in claim.measured
    assert verdict in claim.verdict and (verdict != "reproduced" or claim.verdict == "reproduced")
    assert ("final train loss 3.3 vs adam-nscl's 3.1" in claim.verdict) == (verdict == "it overshoots")
    one_seed = [r for r in results if r.cell.seed == 0]
    assert "needs >= 2 paired seeds" in lr_matching_claim(one_seed).verdict


@pytest.mark.parametrize("replay_held_out", [3.9, 3.1])
def test_ogp_beats_replay_claim_names_a_replay_baseline_worse_than_vanilla(replay_held_out):
    """Reproduced against a replay baseline that ends worse than vanilla on the earlier domains'
    held-out loss: the verdict says the baseline is weak; otherwise it is plain "reproduced"."""
    from lora_cl.reproduce.claims import all_claims
    from lora_cl.reproduce.collect import CellResult
    from lora_cl.reproduce.grid import METHODS, Cell

    forget = {"vanilla": 0.15, "ogp": 0.14, "replay-shared": 0.7}
    held = {"vanilla": 3.26, "ogp": 3.25, "replay-shared": replay_held_out}
    results = [CellResult(Cell("lm8", METHODS[m], seed, "x"),
                          {"metrics": {"loss": {"forgetting": f + seed / 100}}}, 1.0,
                          matrices={"loss": [[0.0] * 3, [0.0] * 3, [held[m] + seed / 10] * 2 + [9.0]]},
                          replay=(1.2, 4) if m == "replay-shared" else None, base_loss=[3.5, 3.5, 3.5])
               for m, f in forget.items() for seed in (0, 1)]
    claims = all_claims(results, None, [])
    row = next(c for c in claims if c.claim == "ogp forgets less than 0.5% replay [lm8]")
    assert "replay-shared - ogp = 0.56 nats" in row.measured
    if replay_held_out > held["vanilla"]:
        assert row.verdict.startswith("reproduced, against a weak baseline: replay-shared ends with a "
                                      f"held-out loss of {replay_held_out + 0.05:.4g} nats")
        assert "vanilla 3.31 (its few buffered examples are memorised" in row.verdict
    else:
        assert row.verdict == "reproduced"


def test_both_factor_and_qa_claims_read_their_own_cells():
    """Part 7 tests ogp against shared projection with both LoRA factors projected (lm8), and on
    the Q/A stream against that stream's best shared baseline (the nearest test of the 7B claim)."""
    from lora_cl.reproduce.claims import all_claims
    from lora_cl.reproduce.collect import CellResult
    from lora_cl.reproduce.grid import METHODS, Cell

    forget = {("lm8", "adam-nscl-both"): 0.11, ("lm8", "ogp-both"): 0.10,
              ("qa8", "gpm"): 0.30, ("qa8", "adam-nscl"): 0.20, ("qa8", "ogp"): 0.25}
    results = [CellResult(Cell(stream, METHODS[m], seed, "x"),
                          {"metrics": {"loss": {"forgetting": f + seed / 1000}}}, 1.0)
               for (stream, m), f in forget.items() for seed in (0, 1, 2)]
    rows = {c.claim: c for c in all_claims(results, None, [])}
    both = rows["Adaptive decoupled (ogp) forgets less than shared projection (adam-nscl), both LoRA "
                "factors projected [lm8]"]
    assert both.measured.startswith("adam-nscl-both - ogp-both = 0.01 nats") and both.verdict == "reproduced"
    qa = next(c for name, c in rows.items() if name.endswith("[qa8]"))
    assert "best shared baseline (adam-nscl)" in qa.claim      # adam-nscl forgets least of gpm, adam-nscl
    assert qa.measured.startswith("adam-nscl - ogp = -0.05 nats")
    assert qa.verdict == "not reproduced: the opposite holds (ogp forgets more)"
    one_seed = [r for r in results if r.cell.seed == 0]
    assert "needs >= 2 paired seeds" in {c.claim: c for c in all_claims(one_seed, None, [])}[qa.claim].verdict


def test_tally_counts_each_verdict_once_under_its_group():
    from lora_cl.reproduce.claims import Claim, tally

    verdicts = ["not reproduced: the opposite holds (ogp forgets more)", "reproduced",
                "reproduced, against a weak baseline: replay-shared ends ...",
                "not reproduced: the difference is not significant (CI includes 0)",
                "not reproduced: max error above 8%", "not testable here: part 6 cells missing",
                "not reproduced: the opposite holds (vanilla forgets more)", "reproduced",
                "not reproduced: the opposite holds (decoupled forgets more than shared: a negative gap)"]
    assert tally([Claim("c", "p", "m", v) for v in verdicts]) == (
        "3 reproduced (1 only against a weak baseline), 5 not reproduced (3 where the opposite holds, "
        "1 with no significant difference, 1 off the paper's stated size), 1 not testable here")
    assert tally([Claim("c", "p", "m", "reproduced")] * 2) == "2 reproduced"


def test_untestable_claims_name_the_command_that_trains_the_missing_cells():
    """A claim short of paired seeds names the `lora-cl reproduce` call for the next seed (only the
    methods lacking it), and the 16-domain projection row never takes replay as a projection."""
    from lora_cl.reproduce.claims import all_claims
    from lora_cl.reproduce.collect import CellResult
    from lora_cl.reproduce.grid import METHODS, Cell

    forget = {("lm8-kjv", "gpm"): {0: 0.1, 1: 0.1}, ("lm8-kjv", "ogp"): {0: 0.2},
              ("lm16", "replay-shared"): {0: 0.05}, ("lm16", "ogp"): {0: 0.3, 1: 0.3}}
    results = [CellResult(Cell(stream, METHODS[m], seed, "x"),
                          {"metrics": {"loss": {"forgetting": f}}}, 1.0)
               for (stream, m), by_seed in forget.items() for seed, f in by_seed.items()]
    rows = {c.claim: c for c in all_claims(results, None, [])}
    kjv = rows["Adaptive decoupled (ogp) forgets less than the best shared baseline (gpm) [lm8-kjv]"]
    assert kjv.measured == "gpm - ogp = -0.1 nats (1 paired seed)"
    assert kjv.verdict == ("not testable here: needs >= 2 paired seeds for a CI "
                           "(train them: `lora-cl reproduce --only 3 --methods ogp --only-seeds 1`)")
    nscl = rows["Shared-routing projection (adam-nscl) forgets less than vanilla Adam [lm8-kjv]"]
    assert nscl.verdict.endswith("(train them: `lora-cl reproduce --only 3 --methods vanilla,adam-nscl "
                                 "--only-seeds 0`)")
    proj = rows["16 domains: ogp beats the best shared projection"]
    assert proj.verdict == ("not testable here: no finished cells of gpm on lm16 yet "
                            "(train them: `lora-cl reproduce --only 4 --methods gpm --only-seeds 0`)")
    qa = next(c for name, c in rows.items() if name.endswith("[qa8]"))
    assert "train them" not in qa.verdict           # no shared cell yet: no baseline to name


def test_seq_len_override_gets_its_own_cells_command_and_pool_flags(tmp_path, capsys):
    """A larger grid (--steps/--seq-len) is a separate cache key, named in the page's commands and
    passed on by the pool to every worker; nonsense values are refused before anything runs."""
    import argparse
    from pathlib import Path

    from lora_cl.reproduce.doc import DEFAULT_CACHE, command

    base = default_settings()
    large = default_settings(steps=200, seq_len=512)
    ogp = part_cells(2, base, ("ogp",))[0].method
    assert config_hash("lm8", ogp, large) != config_hash("lm8", ogp, base)
    assert part_cells(2, large)[0].run_dir(tmp_path) != part_cells(2, base)[0].run_dir(tmp_path)
    expected = "lora-cl reproduce --report --steps 200 --seq-len 512"
    assert command(large, Path(DEFAULT_CACHE), "--report") == expected
    assert "--seq-len" not in command(base, Path(DEFAULT_CACHE))
    pool = _pool_module()
    args = argparse.Namespace(cache=tmp_path, quick=False, model=None, seeds=2, steps=200, seq_len=512)
    job = {"part": 2, "method": "ogp", "seed": 1}
    cmd = pool.job_command(job, args)
    assert cmd[cmd.index("--steps") + 1] == "200" and cmd[cmd.index("--seq-len") + 1] == "512"
    assert cmd[cmd.index("--seeds") + 1] == "2"
    for bad in ("0", "-4", "long"):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", "--only", "2", "--seq-len", bad, "--cache", str(tmp_path),
                  "--docs", str(tmp_path)])
        assert exit_info.value.code == 2
        assert "--seq-len: expected a whole number >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                                # nothing trained or written


def test_pool_starts_only_cells_expected_to_finish_by_the_deadline():
    """The H200 session's case: once a Q/A cell had taken 348 s, four more were started with
    under 140 s left and all were stopped. The pool now scales each estimate by the finished cells'
    measured/estimated ratio (per stream; every stream's largest when its own has none)."""
    pool = _pool_module()

    def job(stream, estimate, seconds=0.0, outcome="ok"):
        return {"stream": stream, "estimate_s": estimate, "seconds": seconds, "outcome": outcome}

    qa, lm16, kjv = job("qa8", 1080), job("lm16", 2160), job("lm8-kjv", 840)
    assert pool.expected_seconds(qa, []) is None and pool.next_job([qa, lm16], [], 10.0) == 0
    finished = [job("lm16", 2160, 254.0), job("qa8", 1080, 348.0),
                job("qa8", 1080, 900.0, "stopped at deadline")]
    assert pool.expected_seconds(lm16, finished) == pytest.approx(254.0)          # its own stream's ratio
    assert pool.expected_seconds(qa, finished) == pytest.approx(348.0)            # stopped cells do not count
    assert pool.expected_seconds(kjv, finished) == pytest.approx(840 * 348 / 1080)  # no kjv yet: the largest
    assert pool.next_job([qa, lm16, kjv], finished, 300.0) == 1                   # skip what cannot finish
    assert pool.next_job([qa, kjv], finished, 131.0) is None


def test_pool_leaves_a_cell_that_cannot_finish_unstarted_and_returns_early(tmp_path, lora_cl_cache):
    import argparse
    import time

    pool = _pool_module()
    settings = default_settings(quick=True, model="tiny", seeds=(0, 1))
    jobs = pool.plan_jobs([2], tmp_path / "cache", settings, ["vanilla"])
    assert [j["seed"] for j in jobs] == [0, 1]
    # seed 0 "should" take 1 s and takes several: seed 1, estimated at 10,000 s, is expected to
    # need far more than the deadline leaves, so it is not started and the pool returns at once
    jobs[0]["estimate_s"], jobs[1]["estimate_s"] = 1.0, 10_000.0
    args = argparse.Namespace(cache=tmp_path / "cache", logs=tmp_path / "logs", quick=True, model="tiny",
                              seeds=2, steps=None, seq_len=None, workers=1, threads=1, deadline=3600.0,
                              start_late=False)
    began = time.monotonic()
    done = pool.run_pool(jobs, args)
    assert time.monotonic() - began < 600                                     # not held to the deadline
    assert [(j["seed"], j["outcome"]) for j in done] == [(0, "ok"), (1, "not started")]
    assert done[1]["expected_s"] > 3600 - done[0]["seconds"]
