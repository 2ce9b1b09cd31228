"""Method presets: resolution, overrides, errors, and the modifier chains they build."""

from __future__ import annotations

import json

import pytest

import lora_cl
from lora_cl import MethodError, MethodSpec, build_modifiers, resolve_method
from lora_cl.modifiers import (
    AGEM,
    EWCPenalty,
    FixedStrength,
    ImportanceRescale,
    OverlapAdaptiveStrength,
    Projection,
    ReplayMix,
)
from lora_cl.subspace import GradientRowBuffer, SubspaceBank

B2 = [GradientRowBuffer, GradientRowBuffer, Projection]  # side "both": an in- and an out-side buffer
CHAINS = {
    "vanilla": [],
    "gpm": [GradientRowBuffer, Projection],  # activation bases for lora_A, gradient rows for lora_B
    "gpm-in": [Projection],
    "gpm-reproject": [GradientRowBuffer, Projection],
    "adam-nscl": B2,
    "adam-nscl-in": [GradientRowBuffer, Projection],
    "ogp-fixed": B2,
    "ogp-fixed-in": [GradientRowBuffer, Projection],
    "ogp": B2,
    "ogp-in": [GradientRowBuffer, Projection],
    "ogp-debiased": B2,
    "ogp-hard-reproject": B2,
    "ewc": [ImportanceRescale],
    "replay": [ReplayMix],
    "agem": [AGEM],
    "ewc-penalty": [EWCPenalty],
}


def test_every_issue_preset_exists():
    assert set(lora_cl.PRESETS) == set(CHAINS)


@pytest.mark.parametrize("name", list(CHAINS))
def test_preset_builds_its_chain(name):
    spec = resolve_method(name)
    mods = build_modifiers(spec, SubspaceBank())
    assert [type(m) for m in mods] == CHAINS[name]
    assert json.loads(json.dumps(spec.to_dict()))["name"] == name


@pytest.mark.parametrize("name", [n for n in CHAINS if resolve_method(n).strength is not None])
def test_projection_presets_protect_both_lora_factors_unless_named_in(name):
    """Default presets: lora_A on its input side and lora_B on its output side, each from a source
    that has that side; "-in" presets: lora_A only."""
    spec = resolve_method(name)
    buffers = {m.side: m for m in build_modifiers(spec, SubspaceBank()) if isinstance(m, GradientRowBuffer)}
    proj = next(m for m in build_modifiers(spec, SubspaceBank()) if isinstance(m, Projection))
    if name.endswith("-in"):
        assert spec.side == "in" and proj.side == "in" and "out" not in buffers
        assert "lora_B unprotected" in lora_cl.methods.protects(spec)
        return
    assert spec.side == "both" and proj.side == "both"
    out = buffers["out"]  # lora_B's output side from gradient rows (activation bases have none)
    assert out.only_names("base.q_proj.lora_B.default.weight")
    assert not out.only_names("base.q_proj.lora_A.default.weight")
    if "in" in buffers:
        assert not buffers["in"].only_names("base.q_proj.lora_B.default.weight")
    assert "lora_A (input side" in lora_cl.methods.protects(spec)
    assert "lora_B (output side" in lora_cl.methods.protects(spec)
    assert spec.reproject_update == name.endswith("-reproject")


def test_activation_bases_without_an_output_source_are_refused():
    with pytest.raises(MethodError, match="activation bases live on the input side.*basis_out='gradient'"):
        resolve_method("gpm", {"basis_out": None})
    with pytest.raises(MethodError, match="side='in' never uses them"):
        resolve_method("gpm-in", {"basis_out": "gradient"})


def test_paper_settings_of_the_projection_presets():
    gpm, nscl, fixed, ogp = (resolve_method(n) for n in ("gpm", "adam-nscl", "ogp-fixed", "ogp"))
    assert (gpm.routing, gpm.alpha, gpm.weighted, gpm.basis, gpm.basis_energy) == (
        "shared", 1.0, False, "activation", 0.97)
    assert (nscl.routing, nscl.alpha, nscl.weighted, nscl.basis, nscl.basis_rank) == (
        "shared", 0.5, True, "gradient", 32)
    assert (fixed.routing, fixed.strength, fixed.alpha) == ("decoupled", "fixed", 0.5)
    strength = [m for m in build_modifiers(ogp, SubspaceBank()) if isinstance(m, Projection)][0].strength
    assert isinstance(strength, OverlapAdaptiveStrength)
    assert (strength.alpha_max, strength.beta, ogp.routing) == (0.5, 0.98, "decoupled")
    buffer = build_modifiers(ogp, SubspaceBank())[0]
    assert isinstance(buffer, GradientRowBuffer) and buffer.rank == 32 and buffer.max_rows == 256
    replay, ewc = resolve_method("replay"), resolve_method("ewc")
    assert (replay.rho, replay.replay_fraction, ewc.lam, ewc.importance) == (0.5, 0.005, 0.5, "fisher")


def test_overrides_field_by_field():
    spec = resolve_method("ogp", overrides={"alpha_max": 0.3, "routing": "shared"})
    assert (spec.alpha_max, spec.routing, spec.name) == (0.3, "shared", "ogp")
    assert resolve_method("ogp").alpha_max == 0.5  # presets are not mutated
    energy = resolve_method("ogp", {"basis_energy": 0.9})
    assert (energy.basis_rank, energy.basis_energy) == (None, 0.9)  # the alternative rule clears
    fixed = resolve_method("ogp-fixed", {"alpha": 1.0, "weighted": False})
    (proj,) = [m for m in build_modifiers(fixed, SubspaceBank()) if isinstance(m, Projection)]
    assert isinstance(proj.strength, FixedStrength) and proj.strength.alpha == 1.0
    assert resolve_method(spec) == spec
    assert resolve_method("Adam_NSCL").name == "adam-nscl"
    both = build_modifiers(resolve_method("ogp", {"side": "both"}), SubspaceBank())
    assert [m.side for m in both if isinstance(m, GradientRowBuffer)] == ["in", "out"]


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("ogpp", {}, "unknown method 'ogpp'; did you mean 'ogp'?"),
    ("replai", {}, "did you mean 'replay'?"),
    ("ogp", {"alpha_mx": 0.3}, "unknown override 'alpha_mx'; did you mean 'alpha_max'?"),
    ("ogp", {"routing": "decoupld"}, "routing must be one of"),
    ("ogp", {"routing": "decoupld"}, "did you mean 'decoupled'?"),
    ("ogp", {"alpha_max": "high"}, "alpha_max must be float, got 'high'"),
    ("ogp", {"alpha_max": 1.5}, "alpha_max must be in [0.0, 1.0]"),
    ("ogp", {"basis": None}, "set basis to 'gradient', 'activation' or 'adapter'"),
    ("ogp", {"basis_rank": 0}, "basis_rank must be a positive int"),
    ("vanilla", {"replay": "mix"}, "routing 'vanilla' never runs the modifiers"),
    ("gpm-in", {"side": "out"}, "activation bases live on the input side"),
])
def test_errors_name_the_problem(method, overrides, message):
    with pytest.raises(MethodError) as err:
        resolve_method(method, overrides)
    assert message in str(err.value)


def test_projection_without_bank_is_an_error():
    with pytest.raises(MethodError, match="pass a SubspaceBank"):
        build_modifiers(resolve_method("ogp"), None)
    assert isinstance(resolve_method("ogp"), MethodSpec)
