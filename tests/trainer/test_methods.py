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

CHAINS = {
    "vanilla": [],
    "gpm": [Projection],
    "adam-nscl": [GradientRowBuffer, Projection],
    "ogp-fixed": [GradientRowBuffer, Projection],
    "ogp": [GradientRowBuffer, Projection],
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
    ("gpm", {"side": "out"}, "activation bases live on the input side"),
])
def test_errors_name_the_problem(method, overrides, message):
    with pytest.raises(MethodError) as err:
        resolve_method(method, overrides)
    assert message in str(err.value)


def test_projection_without_bank_is_an_error():
    with pytest.raises(MethodError, match="pass a SubspaceBank"):
        build_modifiers(resolve_method("ogp"), None)
    assert isinstance(resolve_method("ogp"), MethodSpec)
