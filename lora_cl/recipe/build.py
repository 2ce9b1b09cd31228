"""Build a :class:`Recipe` from plain data: types, sections, domains and methods checked key by key."""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cl.recipe.checks import _check_values
from lora_cl.recipe.schema import (
    _DOMAIN_KEYS,
    _METHOD_KEYS,
    _SECTIONS,
    _TOP_KEYS,
    DomainConfig,
    MethodChoice,
    Recipe,
    _Ctx,
    _did_you_mean,
    is_builtin,
)

if TYPE_CHECKING:
    pass
# ---------------------------------------------------------------- types

def _type_text(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", type(None): "null"}
    options = typing.get_args(hint) if typing.get_origin(hint) not in (list, None) else (hint,)
    return " or ".join("a list of strings" if typing.get_origin(t) is list else names[t] for t in options)


def _fits(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if tp is float else tp)


def _typed(value: Any, hint: Any, key: str, ctx: _Ctx) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) not in (list, None) else (hint,)
    if float in options and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?",
                                                                     value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    for tp in options:
        if _fits(value, tp):
            return float(value) if tp is float else value
    raise ctx.error(key, f"{key} must be {_type_text(hint)}, got {value!r}")


def _keys_ok(raw: Mapping[Any, Any], allowed: Sequence[str], key: str, ctx: _Ctx) -> None:
    for k in raw:
        if k not in allowed:
            full = f"{key}.{k}" if key else str(k)
            hint = _did_you_mean(k, allowed, f"{key}." if key else "")
            raise ctx.error(full, f"unknown key {full}", hint or f"known keys: {', '.join(allowed)}")


def _section(cls: type, raw: Any, key: str, ctx: _Ctx) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ctx.error(key, f"{key} must be a mapping, got {raw!r}")
    names = [f.name for f in fields(cls)]
    _keys_ok(raw, names, key, ctx)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(v, hints[k], f"{key}.{k}", ctx) for k, v in raw.items()})


# ---------------------------------------------------------------- building

def _path(value: str, key: str, ctx: _Ctx, base_dir: Path | None) -> str:
    """A user path resolved against the recipe's folder (the current one for command-line values)."""
    if is_builtin(value):
        return value
    path = Path(value).expanduser()
    base = Path.cwd() if ctx.from_override(key) else base_dir
    if path.is_absolute() or base is not None:
        return os.path.normpath(path if path.is_absolute() else base / path)
    return value


def _domain(raw: Any, key: str, ctx: _Ctx, base_dir: Path | None) -> DomainConfig:
    if isinstance(raw, str):
        raw = {"source": raw}
    if not isinstance(raw, Mapping):
        raise ctx.error(key, f"{key} must be a source string or a mapping with `source`, got {raw!r}")
    _keys_ok(raw, _DOMAIN_KEYS, key, ctx)
    if "source" not in raw:
        raise ctx.error(key, f"{key} has no source",
                        "add `source: debian:<domain>`, `qa:<task>` or a data path")
    domain = _section(DomainConfig, raw, key, ctx)
    domain.source = _path(domain.source, f"{key}.source", ctx, base_dir)
    if domain.eval_source is not None:
        domain.eval_source = _path(domain.eval_source, f"{key}.eval_source", ctx, base_dir)
    return domain


def _method(raw: Any, key: str, ctx: _Ctx) -> MethodChoice:
    if isinstance(raw, str):
        return MethodChoice(name=raw)
    if not isinstance(raw, Mapping):
        raise ctx.error(key, f"{key} must be a method name or a mapping with `name`, got {raw!r}")
    _keys_ok(raw, _METHOD_KEYS, key, ctx)
    if "name" not in raw:
        raise ctx.error(key, f"{key} has no name", "add `name: ogp` (or another preset)")
    name = _typed(raw["name"], str, f"{key}.name", ctx)
    label = _typed(raw.get("label"), str | None, f"{key}.label", ctx)
    return MethodChoice(name=name, label=label,
                        overrides={k: v for k, v in raw.items() if k not in ("name", "label")})


def _build(raw: Any, ctx: _Ctx, base_dir: Path | None, default_output: str) -> Recipe:
    if not isinstance(raw, Mapping):
        raise ctx.error("", f"a recipe is a mapping of keys ({', '.join(_TOP_KEYS)}), got {raw!r}")
    _keys_ok(raw, _TOP_KEYS, "", ctx)
    domains = raw.get("domains")
    if not domains:
        raise ctx.error("domains", "domains is empty" if "domains" in raw else "the recipe has no domains",
                        "list the stream, e.g. domains: [debian:kjv, qa:capitals, data/mine.jsonl]")
    if not isinstance(domains, list):
        raise ctx.error("domains", f"domains must be a list, got {domains!r}")
    compare = raw.get("compare") or []
    if not isinstance(compare, list):
        compare = [compare]
    sections = {name: _section(cls, raw.get(name), name, ctx) for name, cls in _SECTIONS.items()}
    if sections["model"].finetune == "full" and raw.get("lora") is not None:
        raise ctx.error("lora", "model.finetune is full, which trains no LoRA adapter, but the recipe "
                        "has a lora section", "drop the lora section, or use model.finetune: lora")
    training = sections["training"]
    if sections["eval"].general is not None:
        sections["eval"].general = _path(sections["eval"].general, "eval.general", ctx, base_dir)
    if training.deepspeed is not None:
        training.deepspeed = _path(training.deepspeed, "training.deepspeed", ctx, base_dir)
    source_path = _typed(raw.get("source_path"), str | None, "source_path", ctx)
    recipe = Recipe(
        domains=[_domain(d, f"domains[{i}]", ctx, base_dir) for i, d in enumerate(domains)],
        method=_method(raw.get("method", "ogp"), "method", ctx),
        compare=[_method(c, f"compare[{i}]", ctx) for i, c in enumerate(compare)],
        output_dir=_typed(raw.get("output_dir", default_output), str, "output_dir", ctx),
        source_path=source_path, **sections,
    )
    recipe._where = ctx.where
    _check_values(recipe, ctx)
    return recipe


def recipe_from_dict(d: Mapping[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> Recipe:
    """A checked :class:`Recipe` from plain data; relative user paths resolve against ``base_dir``."""
    return _build(d, _Ctx(source), base_dir, "runs/recipe")

