"""The time-scale-matched regime grid: its settings, the quick grid end to end on the tiny model,
the page's verdicts on hand-built cells, Holm's correction and the measured v share."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lora_cl.cli import main
from lora_cl.reproduce.grid import recipe_dict
from lora_cl.reproduce.regime import (
    REGIME_STREAM,
    horizons,
    regime_cells,
    regime_settings,
)
from lora_cl.reproduce.stats import holm


@pytest.mark.parametrize("regime", ["a", "b"])
def test_regime_settings_are_in_regime_and_like_for_like(regime):
    from lora_cl.methods import resolve_method
    from lora_cl.reproduce.regime import PAIRS, regime_methods

    s = regime_settings(regime)
    h = horizons(s, regime)
    assert h["beta2"] >= 5 and h["overlap_ema"] >= 5 and len(s.seeds) >= (5 if regime == "a" else 3)
    table = regime_methods(regime)
    doc = recipe_dict(REGIME_STREAM, table["overlap-decoupled"], 3, s, Path("."))
    if regime == "a":
        assert doc["model"] == {"name": "scratch-5m", "dtype": "float32", "finetune": "full"}
        assert "lora" not in doc
    else:
        assert doc["model"]["name"] == "smollm2-135m" and doc["lora"]["r"] == 8
        assert doc["eval"]["general"] == "debian:gcide"
    assert doc["data"]["seed"] == 3 and doc["data"]["train_chars"] == 1_200_000  # seed draws the held-out set
    # pairs differ in routing only: same bases, side, strength schedule, alpha, EMA, buffer
    for _, shared, decoupled in PAIRS:
        a, b = (resolve_method(table[m].preset, table[m].overrides).to_dict() for m in (shared, decoupled))
        assert a.pop("routing") == "shared" and b.pop("routing") == "decoupled"
        a.pop("name"), b.pop("name")
        assert a == b, (shared, decoupled)
        if a["strength"] == "overlap":  # the EMA's horizon is matched to the steps too
            assert a["beta"] == (0.98 if regime == "a" else 0.95)
    cells = regime_cells(s, regime=regime)
    # one configuration but for the lr check's and controls' own (lr is in the hash: 0.5x, 0.8x,
    # and in (a) 2x, in (b) the plasticity-matched 0.9x); seed-major order
    assert len({c.cfg for c in cells if "@lr" not in c.method.label}) == 1
    assert len({c.cfg for c in cells}) == 4  # (b): no lr check, but the plasticity-matched 0.9x
    assert ("vanilla@lr2x" in table) == (regime == "a")
    assert [c.seed for c in cells[:2]] == [0, 0]
    assert ("fixed-shared@lr0.9x" in table) == (regime == "b")


def test_holm_adjusts_by_rank_and_keeps_missing_values():
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_quick_regime_b_trains_lora_cells_with_a_general_set(tmp_path, lora_cl_cache):
    """Regime b on the tiny model: LoRA cells (both factors), and the EWC and replay pairs run."""
    from lora_cl.reproduce.regime import regime_methods

    cache, docs = tmp_path / "cache", tmp_path / "docs"
    methods = "vanilla,ewc-decoupled,replay-decoupled"
    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--regime", "b", "--quick", "--no-progress", "--methods", methods,
              "--cache", str(cache), "--docs", str(docs)])
    assert done.value.code == 0
    cells = regime_cells(regime_settings("b", quick=True), methods.split(","), regime="b")
    cache = tmp_path / "cache-regime"  # the regime cells live beside the main grid's cache
    assert [c.method for c in cells] == [regime_methods("b")[m] for m in methods.split(",")]
    for cell in cells:
        meta = json.loads((cell.run_dir(cache) / "run.json").read_text())
        assert meta["recipe"]["model"]["finetune"] == "lora"
        assert meta["method"]["routing"] in ("vanilla", "decoupled")
    replay = json.loads(next(cells[2].run_dir(cache).glob("domains/02-*/metrics.json")).read_text())
    assert any(h.get("cl/replay_examples", 0) > 0 for h in replay["log_history"])
    assert (docs / "reproduction" / "regime-b.md").read_text().startswith("# Regime (b)")


def test_quick_regime_grid_trains_caches_and_writes_its_page(tmp_path, lora_cl_cache, capsys):
    cache, docs = tmp_path / "cache", tmp_path / "docs"
    args = ["reproduce", "--regime", "a", "--quick", "--no-progress", "--methods",
            "vanilla,fixed-shared,fixed-decoupled", "--cache", str(cache), "--docs", str(docs)]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    assert "Writing model shards" not in capsys.readouterr().err  # --no-progress: no bars at saves
    settings = regime_settings(quick=True)
    cells = regime_cells(settings, ["vanilla", "fixed-shared", "fixed-decoupled"])
    cache = tmp_path / "cache-regime"  # the regime cells live beside the main grid's cache
    for cell in cells:
        run_dir = cell.run_dir(cache)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["complete"] and summary["T"] == 3
        meta = json.loads((run_dir / "run.json").read_text())
        assert meta["recipe"]["model"]["finetune"] == "full"
        assert not list(run_dir.glob("domains/*/model"))  # pruned: JSON only
    page = (docs / "reproduction" / "regime-a.md").read_text()
    assert page.startswith("# Regime (a)")
    assert "**fixed strength (alpha 0.5): one seed so far, not tested**" in page  # 1 seed: no test
    assert "| in regime | **no** |" in page  # 3 steps is a smoke test, and the page says so
    vanilla = json.loads((cells[0].run_dir(cache) / "summary.json").read_text())
    assert f"{vanilla['metrics']['loss']['forgetting']:.4f} (n = 1)" in page
    assert (docs / "reproduction" / "regime-a-tradeoff.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    assert "0 cells trained, 3 cached" in capsys.readouterr().out
    # an interrupted cell whose weights are gone (pruned, or not kept by git) is trained again from
    # the start, and a cell that fails does not stop the others: the exit status and stderr say so
    partial, broken = cells[1].run_dir(cache), cells[2].run_dir(cache)
    (partial / "summary.json").unlink()
    shutil.rmtree(sorted((partial / "domains").iterdir())[-1])
    (broken / "summary.json").unlink()
    meta = json.loads((broken / "run.json").read_text())
    meta["recipe"]["training"]["lr"] *= 2  # a resume refuses a changed recipe
    (broken / "run.json").write_text(json.dumps(meta))
    from lora_cl.recipe import recipe_from_dict
    from lora_cl.trainer.stream import StreamError, run_method

    recipe = recipe_from_dict(recipe_dict(cells[1].stream, cells[1].method, 0, settings, partial.parent))
    with pytest.raises(StreamError, match=f"delete {partial} to train this run again from the start"):
        run_method(recipe, recipe.method, partial, resume=True, progress=False)  # lora-cl train --resume
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    assert done.value.code == 1 and "1 cells trained, 1 cached, 1 failed" in out
    assert f"{partial}: an interrupted cell without adapter/ or model/ weights, optimizer.pt to resume " \
           "from; training it again from the start" in err
    assert json.loads((partial / "summary.json").read_text())["complete"]
    assert f"lora-cl reproduce: error: cell {broken} failed" in err and "the recipe changed" in err
    meta["recipe"]["training"]["lr"] /= 2  # the recipe restored, the rerun only rewrites its summary
    (broken / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0 and "1 cells trained, 2 cached" in capsys.readouterr().out
    assert json.loads((broken / "summary.json").read_text())["complete"]
    # --only-seeds trains those seeds of --seeds' range (a worker's share); the rest stay untrained
    with pytest.raises(SystemExit):
        main(["reproduce", "--regime", "a", "--quick", "--no-progress", "--methods", "vanilla",
              "--seeds", "3", "--only-seeds", "2", "--no-report", "--cache", str(tmp_path / "cache")])
    assert "1 cells trained, 0 cached" in capsys.readouterr().out
    seeds = regime_cells(regime_settings(quick=True, seeds=(0, 1, 2)), ["vanilla"])
    assert [c.run_dir(cache).is_dir() for c in seeds] == [True, False, True]
    # the main page opens with the regimes' answers and links their pages
    from lora_cl.reproduce import default_settings, write_report

    main_page = write_report(tmp_path / "cache", default_settings(quick=True, model="tiny"), docs).read_text()
    assert "## The answer: decoupled against shared routing where Adam's horizon fits the stream" in main_page
    assert "**Regime (a)** ([its page](reproduction/regime-a.md)): In this regime" in main_page
    assert "**Regime (b)** ([its page](reproduction/regime-b.md)): **No answer yet**" in main_page


def test_regime_refuses_the_main_grids_flags(capsys):
    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--regime", "a", "--only", "2", "--report"])
    assert done.value.code == 2
    assert "--regime a runs its own grid; drop --only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--regime", "a", "--methods", "ogp", "--no-report"])
    assert done.value.code == 2
    assert "ogp: not a regime method; the regime methods are vanilla, fixed-shared" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--regime", "b", "--only-seeds", "3", "--no-report"])
    assert done.value.code == 2
    assert "--only-seeds takes seeds from [0, 1, 2] (set by --seeds)" in capsys.readouterr().err


def _hand_cell(cache: Path, method: str, seed: int, forgetting: float, eta: float, leak: float,
               just_trained: float = 3.0, eta_out: float | None = None,
               v_energy: float | None = None, regime: str = "a") -> None:
    settings = regime_settings(regime)
    cell = next(c for c in regime_cells(settings, [method], regime=regime) if c.seed == seed)
    run = cell.run_dir(cache)
    (run / "domains").mkdir(parents=True)
    loss = {"forgetting": forgetting, "op": 4.0 + forgetting, "diagonal": [just_trained, just_trained]}
    (run / "summary.json").write_text(json.dumps({"complete": True, "metrics": {"loss": loss},
                                                  "protection_leak": [None, {"other": leak}]}))
    for i, name in enumerate(("austen", "python_code")):
        d = run / "domains" / f"{i:02d}-{name}"
        d.mkdir()
        alpha = 1.0 if method.startswith("hard") else 0.5
        history = [{"loss": 3.0, "epoch": 0.8, "probe/old_direction_lr": eta, "projection/alpha": alpha,
                    **({} if eta_out is None else {"probe/old_direction_lr_out": eta_out}),
                    **({} if v_energy is None else {"probe/v_energy_old": v_energy}),
                    **({"cl/replay_examples": 125 * (i + 1)} if method.startswith("replay") else {})},
                   {"cl/v_current_share": 1.0 if i == 0 else 0.99, "epoch": 0.8}]
        (d / "metrics.json").write_text(json.dumps({"log_history": history, "train_seconds": 60.0,
                                                    "protection_leak": None if i == 0 else {"other": leak}}))


def test_page_verdicts_are_paired_holm_corrected_and_sized_against_vanilla(tmp_path):
    """Decoupled forgets 0.2 nats less than shared on every seed (of vanilla's 1.0): the claim
    holds after Holm, as -20% of vanilla; the eta_U ratio (shared / decoupled) reads 2.0."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(5):
        noise = 0.01 * (seed - 2)
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "fixed-shared", seed, 0.8 + noise, 2.0, 0.5)
        _hand_cell(cache, "fixed-decoupled", seed, 0.6 + 2 * noise, 1.0, 0.3)
        _hand_cell(cache, "vanilla@lr2x", seed, 1.5, 1.0, 0.9)
        _hand_cell(cache, "replay-shared", seed, 1.2, 1.0, 0.9)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    claim = next(c for c in page.claims if c.name.startswith("fixed strength"))
    assert claim.nats.ci.n == 5 and claim.nats.ci.mean == pytest.approx(-0.2)
    assert claim.pct.mean == pytest.approx(-20.0) and claim.holds
    assert len(page.claims) == 4 and claim.nats.p_value <= claim.p_holm <= 3 * claim.nats.p_value
    assert not any("@lr" in c.name for c in page.claims)  # the lr check is its own table
    text = page.render()
    assert "**fixed strength (alpha 0.5): decoupled routing forgets less than shared** — -0.200" in text
    assert "(5 seeds, decoupled lower on 5 of 5; Holm-adjusted p = " in text
    claim.p_holm = 0.2  # the interval alone excludes 0, the family-wise test does not: said so
    assert ("**fixed strength (alpha 0.5): decoupled routing forgets less than shared, but not "
            "significantly once Holm corrects for the page's 4 tested claims** — -0.200") in page.answer()
    assert "| fixed strength (alpha 0.5) | 2.000 [2.000, 2.000] | 2.00 |" in text
    assert math.isclose(page.mech_stat("fixed-shared", "v_share").mean, 0.99)
    assert "| vanilla | 0.001 | 5 | 1.0000 [1.0000, 1.0000] |" in text
    assert "| vanilla | 0.002 | 5 | 1.5000 [1.5000, 1.5000] |" in text
    assert "| vanilla | 0.0005 | 0 | — |" in text
    assert ("Replay: 10% of each domain's training blocks kept, 250 examples (32,000 tokens) in the "
            "buffer by the last domain; replay-shared forgets 1.2000 nats against vanilla's 1.0000 "
            "(does not beat vanilla on this stream).") in text
    # a pair with one seed has no interval and no p: said so, and it does not count in the family
    _hand_cell(cache, "ewc-shared", 0, 0.9, 1.0, 0.9)
    _hand_cell(cache, "ewc-decoupled", 0, 0.95, 1.0, 0.9)
    one = RegimePage(cache, regime_settings(), tmp_path / "docs")
    assert len(one.claims) == 7 and one.tested() == 4
    assert "**importance rescaling (EWC, lam 0.5): one seed so far, not tested** (decoupled against " \
           "shared) — 0.050 (n = 1)" in one.answer()
    assert "Holm adjustment over the 4 claims of this page that have a p-value" in one.render()
    assert "| importance rescaling (EWC, lam 0.5): decoupled - shared | 1 | 0.0500 (n = 1) | " \
           "5.0 (n = 1) |  | — | — | not tested (one seed) |" in one.render()
    assert "EWC 5.0 (n = 1)% (one seed, not tested, 1 of 5 seeds)" in one.in_short()[
        next(k for k in one.in_short() if k.startswith("decoupled - shared"))]
    # the page names every method short of its seeds, so "n of N cells" is not the only trace
    assert page.missing()[:2] == ["overlap-shared (0 of 5 seeds)", "overlap-decoupled (0 of 5 seeds)"]
    assert not any(m.startswith(("vanilla (", "fixed-shared (", "fixed-decoupled (")) for m in page.missing())
    assert "Not finished yet: overlap-shared (0 of 5 seeds), overlap-decoupled (0 of 5 seeds), " in text
    # the paper's own beta2 is not run: the page says so, sized by its cells (60 s a domain x 2
    # domains per cell, 20x the steps; 0.8 passes -> 16)
    assert ("Not run: the paper's own beta2 = 0.999 at the same 5 horizons, 5,000 steps per domain, "
            "20x this regime's: about 1 hour per cell on 2 cores at this page's mean cell time (wall "
            "clock: an upper bound) and 16 passes over each domain's training slice of `lm4-long` (the "
            "rule allows ~2)") in text


def test_the_effective_lr_control_is_a_claim_and_each_pair_states_its_plasticity(tmp_path):
    """Hard-decoupled against hard-shared at half the lr is a claim of its own (in the Holm family,
    named by its two labels); every routing bullet gives the pair's paired just-trained and final
    loss, so a method that buys forgetting with plasticity says so where its verdict stands."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "hard-shared", seed, 0.8 + 0.01 * seed, 2.0, 0.2, just_trained=3.0)
        _hand_cell(cache, "hard-decoupled", seed, 0.6 + 0.02 * seed, 1.0, 0.3, just_trained=3.2)
        _hand_cell(cache, "hard-shared@lr0.5x", seed, 0.7 + 0.03 * seed, 1.0, 0.2, just_trained=3.3)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    control = next(c for c in page.claims if c.name.startswith("effective-lr control"))
    assert control.name == "effective-lr control (hard projection): hard-decoupled - hard-shared@lr0.5x"
    assert control.nats.ci.mean == pytest.approx(-0.11) and len(page.claims) == 4
    answer = page.answer()
    assert ("**effective-lr control (hard projection): decoupled routing forgets less than "
            "hard-shared@lr0.5x") in answer
    assert ("just-trained loss -0.100 [-0.100, -0.100] and final loss -0.110 [-0.135, -0.085] nats, "
            "decoupled - hard-shared@lr0.5x.") in answer
    assert ("just-trained loss 0.200 [0.200, 0.200] and final loss -0.190 [-0.215, -0.165] nats, "
            "decoupled - shared.") in answer
    assert "(1/(1 - alpha) = unbounded at alpha 1)" in answer
    row = ("| hard-shared | 0.0005 | 3 | 0.7300 [0.6555, 0.8045] | 4.730 [4.655, 4.805] "
           "| 3.300 [3.300, 3.300] |")
    assert row in page.render()


def test_current_v_share_is_the_domains_share_of_v_mass():
    """v after k steps on a new gradient: beta2^k v0 + (1 - beta2^k) g2^2; the share is the second
    term over the sum, computed here by hand for one tensor stepped on two constant gradients."""
    from lora_cl import RoutedAdamW
    from lora_cl.trainer.callback import current_v_share, v_mass

    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = RoutedAdamW([{"params": [p], "routing": "vanilla"}], lr=1e-3, betas=(0.9, 0.95))
    g1, g2 = torch.full((3, 4), 0.1), torch.full((3, 4), 0.3)
    for _ in range(7):
        p.grad = g1.clone()
        opt.step()
    start = (v_mass(opt), opt.global_step)
    for _ in range(4):
        p.grad = g2.clone()
        opt.step()
    b = 0.95
    v0 = (1 - b**7) * 0.01
    fresh = (1 - b**4) * 0.09
    assert current_v_share(opt, start) == pytest.approx(fresh / (b**4 * v0 + fresh), rel=1e-5)
    assert current_v_share(opt, None) == 1.0


def test_a_claim_holds_only_when_its_holm_adjusted_p_does():
    """p = 0.025 with an interval excluding 0 fails once Holm lifts it to 0.075."""
    from lora_cl.reproduce.regime_doc import Claim
    from lora_cl.reproduce.stats import mean_ci, paired

    diffs = dict(enumerate([-0.05, -0.35, -0.1, -0.3, -0.2]))
    nats = paired(diffs, dict.fromkeys(range(5), 0.0))
    assert 0.02 < nats.p_value < 0.03 and nats.ci.excludes_zero()
    claim = Claim("x", "a", "b", nats, mean_ci([-20.0]), p_holm=nats.p_value)
    assert claim.holds
    claim.p_holm = 3 * nats.p_value
    assert not claim.holds


def test_the_output_sides_inflation_is_its_own_column_where_cells_logged_it(tmp_path):
    """Regime (b) protects lora_B on its output side; cells that logged that side's probe give its
    shared / decoupled ratio beside the input side's, in the table and in the answer."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "fixed-shared", seed, 0.8, 2.0, 0.5, eta_out=3.0, v_energy=0.25)
        _hand_cell(cache, "fixed-decoupled", seed, 0.7 + 0.01 * seed, 1.0, 0.3, eta_out=1.0, v_energy=1.0)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    # and R_v, v's energy along the bases, decoupled / shared, beside its 1/(1 - alpha)^2
    row = ("| fixed strength (alpha 0.5) | 2.000 [2.000, 2.000] | 3.000 [3.000, 3.000] | 2.00 "
           "| 4.000 [4.000, 4.000] | 4.00 |")
    assert row in page.render()
    assert ("old-direction learning rate was 2.00 [2.00, 2.00]x the decoupled run's on the input side "
            "(lora_A) and 3.00 [3.00, 3.00]x on the output side (lora_B) (1/(1 - alpha) = 2.00)"
            ) in page.answer()


def test_the_inflation_is_read_where_v_reflects_the_domain(tmp_path):
    """A probe early in a domain reads a v that is mostly the previous domain's: the page reads eta_U
    from 3 horizons of beta2 into each domain on (regime (a): step 150 at beta2 = 0.98), and the
    regime cells probe at every log, which leaves their config hash as it was."""
    from dataclasses import replace

    from lora_cl.reproduce.grid import config_hash
    from lora_cl.reproduce.regime_doc import RegimePage, settled_step

    settings = regime_settings()
    assert settled_step(settings) == 150 and settled_step(regime_settings("b")) == 60
    cache = tmp_path / "cells"
    for method, early, late in (("fixed-shared", 5.0, 2.0), ("fixed-decoupled", 1.0, 1.0)):
        for seed in range(2):
            _hand_cell(cache, method, seed, 0.5, 0.0, 0.5)
            run = next(c for c in regime_cells(settings, [method]) if c.seed == seed).run_dir(cache)
            for d in sorted((run / "domains").iterdir()):
                doc = json.loads((d / "metrics.json").read_text())
                doc["log_history"] = [{"step": 10, "probe/old_direction_lr": early},
                                      {"step": 200, "probe/old_direction_lr": late},
                                      {"step": 250, "probe/old_direction_lr": 1.0},
                                      {"step": 250, "probe/old_direction_lr": 1.0}]  # (counts once)
                (d / "metrics.json").write_text(json.dumps(doc))
    page = RegimePage(cache, settings, tmp_path / "docs")
    # shared (2 + 1) / 2 over decoupled (1 + 1) / 2: step 10 left out, the repeated 250 counted once
    assert page.mech_ratio("fixed-shared", "fixed-decoupled").mean == pytest.approx(1.5)
    assert "read from step 150 of each domain on" in page.render()
    for regime in ("a", "b"):
        s = regime_settings(regime)
        assert s.probe_every == 1
        cell = regime_cells(s, ["vanilla"], regime=regime)[0]
        assert recipe_dict(cell.stream, cell.method, 0, s, Path("."))["eval"]["probe_every"] == 1
        assert cell.cfg == config_hash(cell.stream, cell.method, replace(s, probe_every=10))


def test_each_regime_page_names_its_own_training():
    """Regime (b) trains a LoRA adapter on the pretrained SmolLM2; its page's opening said
    "full-parameter training ... from scratch", regime (a)'s words (the committed pages are what
    the committed cells generate: tests/test_docs_examples.py)."""
    pages = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
    b = (pages / "regime-b.md").read_text(encoding="utf-8")
    assert "In this regime" in b and "a LoRA adapter on the pretrained smollm2-135m" in b
    assert "from scratch" not in b.split("## The regime")[0]
    assert "full-parameter training of scratch-5m from scratch" in (pages / "regime-a.md").read_text(
        encoding="utf-8")


def test_decoupling_is_set_against_the_line_through_shared_routings_two_lrs(tmp_path):
    """Shared at the regime's lr: forgetting 0.8, just-trained 3.0; at 0.8x: 0.6 and 3.2 (a trade).
    The line gives 0.7 at the decoupled run's just-trained 3.1; it forgets 0.65: 0.05 beyond the
    line on every seed (5% of vanilla's 1.0). A cut that costs no plasticity has no line."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        noise = 0.01 * seed
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "fixed-shared", seed, 0.8 + noise, 2.0, 0.5, just_trained=3.0)
        _hand_cell(cache, "fixed-shared@lr0.8x", seed, 0.6 + noise, 1.6, 0.5, just_trained=3.2)
        _hand_cell(cache, "fixed-decoupled", seed, 0.65 + noise, 1.0, 0.3, just_trained=3.1 + noise)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    fr = page.frontier("fixed-shared", "fixed-shared@lr0.8x", "fixed-decoupled")
    # seed k: the line at 3.1 + 0.01 k is 0.8 + 0.01 k - (0.1 + 0.01 k); decoupled 0.65 + 0.01 k
    assert fr.seeds == 3 and fr.outside == 0 and fr.no_trade == 0
    assert fr.gap.diffs == pytest.approx([-0.05, -0.04, -0.03])
    assert fr.pct.mean == pytest.approx(-4.0) and fr.d_just_trained.mean == pytest.approx(0.2)
    text = page.render()
    assert ("| effective-lr control (fixed strength) | fixed-shared@lr0.8x | 3 | -0.2000 [-0.2000, -0.2000] "
            "| 0.2000 [0.2000, 0.2000] | 3 | -0.0400 [-0.0648, -0.0152] | -4.0 [-6.5, -1.5] |") in text
    assert "**decoupled beyond the line** (less forgetting at equal plasticity) |" in text

    for seed in range(3):  # the cut now learns better too: nothing to trade, no line
        shutil.rmtree(regime_cells(regime_settings(), ["fixed-shared@lr0.8x"])[seed].run_dir(cache))
        _hand_cell(cache, "fixed-shared@lr0.8x", seed, 0.6, 1.6, 0.5, just_trained=2.9)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    fr = page.frontier("fixed-shared", "fixed-shared@lr0.8x", "fixed-decoupled")
    assert fr.no_trade == 3 and fr.gap.ci.n == 0
    assert "no seed to judge; seeds left out: 3 where the cut was no trade-off" in page.render()

    for seed in range(3):  # a trade, but the decoupled run learned worse than both: not judged
        shutil.rmtree(regime_cells(regime_settings(), ["fixed-shared@lr0.8x"])[seed].run_dir(cache))
        _hand_cell(cache, "fixed-shared@lr0.8x", seed, 0.6, 1.6, 0.5, just_trained=3.05)
    fr = RegimePage(cache, regime_settings(), tmp_path / "docs").frontier(
        "fixed-shared", "fixed-shared@lr0.8x", "fixed-decoupled")
    assert fr.outside == 3 and fr.gap.ci.n == 0


def test_the_lr_check_pairs_the_method_with_vanilla_at_each_lr(tmp_path):
    """overlap-decoupled forgets 9% less than vanilla at the regime's lr (0.91 on average against
    1.0) and 5% less at half of it (0.76 against 0.8): each lr gets its own paired row, in % of
    that lr's vanilla."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        noise = 0.01 * seed
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "overlap-decoupled", seed, 0.9 + noise, 1.0, 0.5)
        _hand_cell(cache, "vanilla@lr0.5x", seed, 0.8, 1.0, 0.9)
        _hand_cell(cache, "overlap-decoupled@lr0.5x", seed, 0.76, 1.0, 0.5)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    ranking = {lr: (f, pct) for lr, f, pct, _ in page.lr_ranking()}
    lr = regime_settings().lr
    assert ranking[lr][0].ci.mean == pytest.approx(-0.09) and ranking[lr][1].mean == pytest.approx(-9.0)
    assert ranking[lr / 2][0].ci.mean == pytest.approx(-0.04)
    assert ranking[lr / 2][1].mean == pytest.approx(-5.0)
    assert ranking[2 * lr][0].ci.n == 0  # not run: no row
    text = page.render()
    assert f"\n| {lr / 2:g} | 3 | -0.0400 [-0.0400, -0.0400] | -5.0 [-5.0, -5.0] | 0 |" in text
    assert f"\n| {2 * lr:g} | " not in text
    # the rows' % of vanilla in one line, in lr order, for a summary to quote whole
    assert "In % of that lr's vanilla forgetting, at 0.5x, 1x the lr: -5.0, -9.0." in text


def test_the_reproduction_page_opens_with_a_generated_plain_answer(tmp_path):
    """The main page's answer: how many projection pairs hold (decoupled forgets less, Holm), by how
    much, the paper's method against vanilla beside -29%, and where decoupling lies against the lr
    line; each regime's column of the summary table names every pair's effect and verdict."""
    from lora_cl.reproduce.doc import _plain_answer
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        noise = 0.01 * seed
        _hand_cell(cache, "vanilla", seed, 1.0, 1.0, 0.9)
        _hand_cell(cache, "fixed-shared", seed, 0.8 + noise, 2.0, 0.5, just_trained=3.0)
        _hand_cell(cache, "fixed-decoupled", seed, 0.6 + 1.5 * noise, 1.0, 0.3, just_trained=3.1 + noise)
        _hand_cell(cache, "fixed-shared@lr0.8x", seed, 0.55 + noise, 1.6, 0.5, just_trained=3.2)
        _hand_cell(cache, "overlap-shared", seed, 0.9 + (0.02, -0.02, 0.0)[seed], 1.0, 0.5)
        _hand_cell(cache, "overlap-decoupled", seed, 0.9, 1.0, 0.5)
    page = RegimePage(cache, regime_settings(), tmp_path / "docs")
    text = _plain_answer({"a": page})
    assert ("decoupled routing forgets less than shared routing in 1 of the 2 projection pairs tested "
            "in regime (a), by 19.5% of vanilla's forgetting; the rest show no difference that "
            "survives the correction.") in text
    assert "The paper's method against vanilla AdamW: -10.0% in (a), where the paper claims -29%." in text
    # seed k: the line through (3.0, 0.8 + k/100) and (3.2, 0.55 + k/100) at the decoupled run's
    # J = 3.1 + k/100 is 0.675 - 0.0025 k; it forgets 0.6 + 0.015 k: -0.075, -0.0575, -0.04 beyond
    assert "decoupled routing lies beyond it in (a; shared at 1x and 0.8x the lr)." in text
    # and directly against shared at the lower lr: 0.6 + 0.015k against 0.55 + 0.01k forgets more
    assert ("Directly against shared routing at a lower lr (decoupled - shared, % of vanilla's forgetting, "
            "Holm-corrected): +5.5% against fixed-shared at 0.8x the lr in (a): none shows decoupling "
            "forgetting less than shared routing at the lower lr.") in text
    short = page.in_short()
    assert short["decoupled - shared (same bases, strength, lr)"].startswith(
        "fixed -19.5 [-20.7, -18.3]% (holds, 3 of 5 seeds); overlap-adaptive 0.0 [-5.0, 5.0]% "
        "(no difference detectable, 3 of 5 seeds); hard: not run; EWC: not run")
    assert short["old-direction lr, shared / decoupled, fixed alpha"] == "2.00x; Proposition 1: 2.00x"


def test_regime_b_compares_decoupling_with_shared_routing_at_a_plasticity_matched_lr(tmp_path):
    """Regime (b)'s own control: fixed-shared at 0.9x the lr, where its just-trained loss meets the
    decoupled run's. It is a claim of the Holm family (decoupled - fixed-shared@lr0.9x), has its
    own line in the frontier table, and the lr section says why it was run."""
    from lora_cl.reproduce.regime_doc import RegimePage

    cache = tmp_path / "cells"
    for seed in range(3):
        noise = 0.01 * seed
        for method, f, j in (("vanilla", 1.0, 3.0), ("fixed-shared", 0.8, 3.0),
                             ("fixed-shared@lr0.8x", 0.6, 3.2), ("fixed-shared@lr0.9x", 0.72, 3.1),
                             ("fixed-decoupled", 0.65 + noise, 3.1)):
            _hand_cell(cache, method, seed, f + noise, 1.0, 0.5, just_trained=j, regime="b")
    page = RegimePage(cache, regime_settings("b"), tmp_path / "docs", "b")
    claim = page.claim("fixed-decoupled", "fixed-shared@lr0.9x")
    assert claim is not None and claim.name.startswith("plasticity-matched lr control (fixed strength)")
    assert claim.nats.ci.mean == pytest.approx(-0.06)  # 0.65 + 0.02k against 0.72 + 0.01k
    # the line through 1x and 0.9x at J = 3.1 is 0.9x's own point: the gap is the claim's difference
    fr = page.frontier("fixed-shared", "fixed-shared@lr0.9x", "fixed-decoupled")
    assert fr.gap.diffs == pytest.approx([-0.07, -0.06, -0.05]) and fr.side == "beyond"
    text = page.render()
    assert "and in this regime fixed-shared at 0.9x, the lr at which its just-trained loss matches" in text
    assert ("The lr check (vanilla and overlap-decoupled at half and twice the lr) runs in regime (a) "
            "only.") in text
    assert "| plasticity-matched lr control (fixed strength) | fixed-shared@lr0.9x | 3 |" in text
    assert "against the line through shared's lr and 0.9x: -5.9 [" in " ".join(page.in_short().values())
    regime_a = RegimePage(cache, regime_settings("a"), tmp_path / "docs", "a")
    assert "fixed-shared at 0.9x" not in regime_a.render()
    from lora_cl.reproduce.doc import _plain_answer

    assert ("forgetting, Holm-corrected): +5.9% against fixed-shared at 0.8x the lr in (b); -5.9% against "
            "fixed-shared at 0.9x the lr in (b): decoupling forgets less than the lower-lr shared run in "
            "1 of 2.") in _plain_answer({"b": page})
