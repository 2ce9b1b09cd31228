"""Continual-learning methods as named presets: a :class:`MethodSpec` and the modifiers it builds.

A method is a moment routing plus a chain of gradient modifiers g -> g~ and the source of the
old-domain bases they project on. ``resolve_method("ogp", overrides={"alpha_max": 0.3})``
returns the preset with fields replaced; :func:`build_modifiers` turns a spec into the chain
:class:`~lora_cl.RoutedAdamW` runs.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lora_cl.grouping import tensor_kind
from lora_cl.modifiers import (
    AGEM,
    EWCPenalty,
    FixedStrength,
    GradientModifier,
    Importance,
    ImportanceRescale,
    OverlapAdaptiveStrength,
    Projection,
    ReplayMix,
    Strength,
)
from lora_cl.optim import ROUTINGS
from lora_cl.subspace import GradientRowBuffer, SubspaceBank

STRENGTHS = (None, "fixed", "overlap")
BASES = (None, "gradient", "activation", "adapter")
SIDES = ("in", "out", "both")
PENALTIES = (None, "rescale", "ewc")
IMPORTANCES = ("fisher", "si")
REPLAYS = (None, "mix", "agem")
BANK_MODES = ("accumulate", "replace")
SCOPES = ("global", "tensor")
#: How activation (GPM) bases are sampled: forwards at the domain's end, or the last training steps' inputs.
ACTIVATION_SAMPLES = ("end", "last_steps")


class MethodError(ValueError):
    """An unknown method, an unknown override key or an inconsistent method spec."""


@dataclass(frozen=True)
class MethodSpec:
    """One continual-learning method: routing, modifier chain and basis source, field by field.

    Projection (``strength`` set): g~ = g - alpha * G U diag(s) U^T, s = 1 unless ``weighted``;
    alpha fixed (``alpha``) or overlap-adaptive alpha_t = alpha_max * (1 - sbar_t), sbar_t an
    EMA (``beta``) of s_t = ||G U||^2 / ||G||^2. Bases U per finished domain from ``basis``:
    raw-gradient rows sampled over the domain's last ``basis_window_steps`` steps (or all of
    it, if shorter), at most ``basis_rows`` rows per tensor ("gradient"), layer inputs ("activation",
    GPM: ``basis_examples`` examples run through the model at the domain's end, or, with
    ``activation_sample="last_steps"``, the inputs of the domain's last training forwards over as
    many examples, sampled by hooks: no extra forward, weights still moving) or the learned
    dW = scaling * B A ("adapter"); kept by ``basis_rank`` or
    ``basis_energy``. ``side="both"`` protects both factors of each LoRA layer: lora_A on its
    input side, lora_B on its output side; activation bases exist only on the input side, so
    ``basis_out="gradient"`` gives lora_B output-side bases from its gradient rows (rank
    ``basis_rank``, else 32). Penalty: g~ = g * clamp(1 - lam * Omega, 0, 1) ("rescale") or
    g~ = g + lam * F * (theta - theta*) ("ewc"). Replay: g~ = (1 - rho) g + rho g_r ("mix") or
    A-GEM ("agem"), g_r from ``replay_fraction`` of each earlier domain's examples.
    """

    name: str
    routing: str = "decoupled"
    # projection on old-domain subspaces
    strength: str | None = None
    alpha: float = 1.0
    alpha_max: float = 0.5
    beta: float = 0.98
    warmup: int = 0
    scope: str = "global"
    bias_correction: bool = False
    weighted: bool = True
    side: str = "in"
    reproject_update: bool = False
    # where each finished domain's bases come from
    basis: str | None = None
    basis_rank: int | None = None
    basis_energy: float | None = None
    basis_out: str | None = None
    basis_rows: int = 256
    basis_window_steps: int = 256
    basis_examples: int = 64
    activation_sample: str = "end"
    bank_mode: str = "accumulate"
    bank_max_rank: int | None = None
    # importance penalties
    penalty: str | None = None
    importance: str = "fisher"
    lam: float = 0.5
    # replay
    replay: str | None = None
    rho: float = 0.5
    replay_fraction: float = 0.005
    replay_batch_size: int | None = None

    @property
    def needs_bank(self) -> bool:
        """Whether the method keeps old-domain bases (projection or an explicit basis source)."""
        return self.strength is not None or self.basis is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (JSON-serialisable)."""
        return asdict(self)


def _preset(name: str, **fields_: Any) -> MethodSpec:
    return MethodSpec(name=name, **fields_)


_GRADIENT_BASES = dict(basis="gradient", basis_rank=32)
_GPM = dict(strength="fixed", alpha=1.0, weighted=False, basis="activation", basis_energy=0.97)
_NSCL = dict(strength="fixed", alpha=0.5, weighted=True, **_GRADIENT_BASES)
_OGP = dict(routing="decoupled", strength="overlap", alpha_max=0.5, beta=0.98, weighted=True,
            **_GRADIENT_BASES)

#: The named presets; every field can be overridden. The projection presets protect both factors
#: of each LoRA layer (lora_A's input side, lora_B's output side); ``-in`` variants protect lora_A
#: only (the paper's and the first releases' setting); ``-reproject`` variants of the hard
#: projection also re-project Adam's final update (Adam-NSCL style), since the element-wise
#: division by sqrt(v) moves a projected step back into the protected subspace.
PRESETS: dict[str, MethodSpec] = {
    "vanilla": _preset("vanilla", routing="vanilla"),
    "gpm": _preset("gpm", routing="shared", side="both", basis_out="gradient", **_GPM),
    "gpm-in": _preset("gpm-in", routing="shared", side="in", **_GPM),
    "gpm-reproject": _preset("gpm-reproject", routing="shared", side="both", basis_out="gradient",
                             reproject_update=True, **_GPM),
    "adam-nscl": _preset("adam-nscl", routing="shared", side="both", **_NSCL),
    "adam-nscl-in": _preset("adam-nscl-in", routing="shared", side="in", **_NSCL),
    "ogp-fixed": _preset("ogp-fixed", routing="decoupled", side="both", **_NSCL),
    "ogp-fixed-in": _preset("ogp-fixed-in", routing="decoupled", side="in", **_NSCL),
    "ogp": _preset("ogp", side="both", **_OGP),
    "ogp-in": _preset("ogp-in", side="in", **_OGP),
    # lora-cl's variant, not the paper's: alpha from the bias-corrected overlap EMA
    "ogp-debiased": _preset("ogp-debiased", side="both", bias_correction=True, **_OGP),
    "ogp-hard-reproject": _preset("ogp-hard-reproject", routing="decoupled", side="both",
                                  reproject_update=True, **{**_NSCL, "alpha": 1.0, "weighted": False}),
    "ewc": _preset("ewc", routing="shared", penalty="rescale", importance="fisher", lam=0.5),
    "replay": _preset("replay", routing="shared", replay="mix", rho=0.5, replay_fraction=0.005),
    "agem": _preset("agem", routing="shared", replay="agem", replay_fraction=0.005),
    "ewc-penalty": _preset("ewc-penalty", routing="shared", penalty="ewc", importance="fisher",
                           lam=1.0),
}

def protects(spec: MethodSpec) -> str:
    """Which tensors the method's projection protects, and from which basis source."""
    if spec.strength is None:
        return "no projection"
    source = {"gradient": "gradient rows", "activation": "layer inputs (GPM)",
              "adapter": "the learned dW"}[spec.basis or "gradient"]
    out = {"gradient": "gradient rows", "activation": "layer inputs",
           "adapter": "the learned dW"}[spec.basis_out or spec.basis or "gradient"]
    if spec.side == "in":
        return f"lora_A (input side, {source}); lora_B unprotected"
    if spec.side == "out":
        return f"lora_B (output side, {out}); lora_A unprotected"
    return f"lora_A (input side, {source}) and lora_B (output side, {out})"


_FIELDS = tuple(f.name for f in fields(MethodSpec) if f.name != "name")


def method_names() -> list[str]:
    """Names of the presets."""
    return list(PRESETS)


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_method(method: str | MethodSpec, overrides: Mapping[str, Any] | None = None) -> MethodSpec:
    """The preset (or spec) ``method`` with ``overrides`` applied and checked.

    Overriding one of ``basis_rank``/``basis_energy`` clears the other (they are alternative
    rules). Unknown names and keys raise :class:`MethodError` with a did-you-mean hint.
    """
    if isinstance(method, MethodSpec):
        spec = method
    elif isinstance(method, str):
        key = method.strip().lower().replace("_", "-")
        if key not in PRESETS:
            raise MethodError(f"unknown method {method!r}{_did_you_mean(key, PRESETS)} "
                              f"(methods: {', '.join(PRESETS)})")
        spec = PRESETS[key]
    else:
        raise MethodError(f"method must be a preset name or a MethodSpec, got {type(method).__name__}")
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        k = unknown[0]
        raise MethodError(f"method {spec.name!r}: unknown override {k!r}{_did_you_mean(k, _FIELDS)} "
                          f"(fields: {', '.join(_FIELDS)})")
    if "basis_rank" in overrides and "basis_energy" not in overrides:
        overrides["basis_energy"] = None
    elif "basis_energy" in overrides and "basis_rank" not in overrides:
        overrides["basis_rank"] = None
    spec = replace(spec, **overrides)
    validate(spec)
    return spec


def _type_ok(value: Any, hint: Any) -> bool:
    options = typing.get_args(hint) or (hint,)
    for tp in options:
        if tp is type(None) and value is None:
            return True
        if tp is bool and isinstance(value, bool):
            return True
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if tp is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) or (hint,)
    return " or ".join("None" if tp is type(None) else tp.__name__ for tp in options)


def validate(spec: MethodSpec) -> None:
    """Raise :class:`MethodError` naming the first bad field of ``spec``."""
    hints = typing.get_type_hints(MethodSpec)
    where = f"method {spec.name!r}"
    for name in _FIELDS:
        value = getattr(spec, name)
        if not _type_ok(value, hints[name]):
            raise MethodError(f"{where}: {name} must be {_type_name(hints[name])}, got {value!r}")
    choices = {"routing": tuple(ROUTINGS), "strength": STRENGTHS, "basis": BASES, "side": SIDES,
               "penalty": PENALTIES, "importance": IMPORTANCES, "replay": REPLAYS,
               "bank_mode": BANK_MODES, "scope": SCOPES, "activation_sample": ACTIVATION_SAMPLES}
    for name, allowed in choices.items():
        value = getattr(spec, name)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            hint = _did_you_mean(value, [a for a in allowed if a]) if isinstance(value, str) else ""
            raise MethodError(f"{where}: {name} must be one of {shown}, got {value!r}{hint}")
    for name, lo, hi in (("alpha", 0.0, 1.0), ("alpha_max", 0.0, 1.0), ("rho", 0.0, 1.0),
                         ("replay_fraction", 0.0, 1.0)):
        if not lo <= getattr(spec, name) <= hi:
            raise MethodError(f"{where}: {name} must be in [{lo}, {hi}], got {getattr(spec, name)}")
    if not 0.0 <= spec.beta < 1.0:
        raise MethodError(f"{where}: beta must be in [0, 1), got {spec.beta}")
    if spec.lam < 0:
        raise MethodError(f"{where}: lam must be >= 0, got {spec.lam}")
    for name in ("basis_rows", "basis_window_steps", "basis_examples", "basis_rank", "bank_max_rank",
                 "replay_batch_size"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise MethodError(f"{where}: {name} must be a positive int, got {value}")
    if spec.warmup < 0:
        raise MethodError(f"{where}: warmup must be >= 0, got {spec.warmup}")
    if spec.bias_correction and spec.strength != "overlap":
        raise MethodError(f"{where}: bias_correction=True corrects the overlap EMA of "
                          f"strength='overlap', but strength is {spec.strength!r}; drop it or set "
                          "strength='overlap'")
    if spec.basis_energy is not None and not 0.0 < spec.basis_energy <= 1.0:
        raise MethodError(f"{where}: basis_energy must be in (0, 1], got {spec.basis_energy}")
    if spec.basis_rank is not None and spec.basis_energy is not None:
        raise MethodError(f"{where}: give basis_rank or basis_energy, not both")
    if spec.strength is not None and spec.basis is None:
        raise MethodError(f"{where}: strength={spec.strength!r} projects on old-domain bases but "
                          "basis is None; set basis to 'gradient', 'activation' or 'adapter'")
    if spec.basis_out not in (None, "gradient"):
        raise MethodError(f"{where}: basis_out must be None or 'gradient', got {spec.basis_out!r}")
    if spec.basis == "activation" and spec.side != "in" and spec.basis_out != "gradient":
        raise MethodError(f"{where}: activation bases live on the input side; use side='in', or "
                          "set basis_out='gradient' to protect lora_B's output side from its "
                          "gradient rows")
    if spec.activation_sample != "end" and spec.basis != "activation":
        raise MethodError(f"{where}: activation_sample={spec.activation_sample!r} chooses how "
                          f"activation bases are sampled, but basis is {spec.basis!r}; drop it or set "
                          "basis='activation'")
    if spec.basis_out is not None and spec.side == "in":
        raise MethodError(f"{where}: basis_out={spec.basis_out!r} gives output-side bases, but "
                          "side='in' never uses them; set side='both' or drop basis_out")
    if spec.replay is not None and spec.replay_fraction <= 0:
        raise MethodError(f"{where}: replay={spec.replay!r} draws from a buffer of earlier domains' "
                          "examples but replay_fraction is 0; set replay_fraction > 0, e.g. 0.005, "
                          "or use a method without replay")
    if spec.routing == "vanilla" and (spec.strength or spec.penalty or spec.replay or spec.basis):
        raise MethodError(f"{where}: routing 'vanilla' never runs the modifiers; choose "
                          "routing 'shared' or 'decoupled' for a method with modifiers")


def _not_lora_b(name: str) -> bool:
    return tensor_kind(name) != "lora_B"


def _not_lora_a(name: str) -> bool:
    return tensor_kind(name) != "lora_A"


def make_strength(spec: MethodSpec) -> Strength:
    """The strength schedule of ``spec`` (FixedStrength or OverlapAdaptiveStrength)."""
    if spec.strength == "fixed":
        return FixedStrength(spec.alpha)
    if spec.strength == "overlap":
        return OverlapAdaptiveStrength(alpha_max=spec.alpha_max, beta=spec.beta,
                                       warmup=spec.warmup, scope=spec.scope,
                                       bias_correction=spec.bias_correction)
    raise MethodError(f"method {spec.name!r} has no projection strength")


def build_modifiers(spec: MethodSpec, bank: SubspaceBank | None) -> list[GradientModifier]:
    """The modifier chain of ``spec``: gradient-row buffers first, then projection, penalty, replay."""
    validate(spec)
    mods: list[GradientModifier] = []
    sides = ("in", "out") if spec.side == "both" else (spec.side,)
    # side "both" on LoRA: lora_A keeps an input-side basis, lora_B an output-side one (each
    # factor's other side is the rank-r space, which a rank-k basis would block wholesale)
    only = {"in": _not_lora_b, "out": _not_lora_a} if spec.side == "both" else {}
    for side in sides:
        source = spec.basis_out if side == "out" and spec.basis_out else spec.basis
        if source != "gradient":
            continue
        own_rule = source == spec.basis
        mods.append(GradientRowBuffer(side, max_rows=spec.basis_rows,
                                      window_steps=spec.basis_window_steps,
                                      rank=spec.basis_rank if own_rule else (spec.basis_rank or 32),
                                      energy=spec.basis_energy if own_rule else None,
                                      only_names=only.get(side)))
    if spec.strength is not None:
        if bank is None:
            raise MethodError(f"method {spec.name!r} projects on old-domain bases: pass a SubspaceBank")
        mods.append(Projection(bank, make_strength(spec), weighted=spec.weighted, side=spec.side))
    if spec.penalty == "rescale":
        mods.append(ImportanceRescale(Importance(kind=spec.importance), lam=spec.lam))
    elif spec.penalty == "ewc":
        mods.append(EWCPenalty(lam=spec.lam, importance=Importance(kind=spec.importance)))
    if spec.replay == "mix":
        mods.append(ReplayMix(rho=spec.rho))
    elif spec.replay == "agem":
        mods.append(AGEM())
    return mods
