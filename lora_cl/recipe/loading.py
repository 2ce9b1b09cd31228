"""Recipes from YAML with ``file:line`` for every key, and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_cl.recipe.build import _build
from lora_cl.recipe.schema import (
    _DOMAIN_KEYS,
    _METHOD_KEYS,
    _SECTIONS,
    _TOP_KEYS,
    Recipe,
    RecipeError,
    _Ctx,
    _did_you_mean,
)

if TYPE_CHECKING:
    pass
# ---------------------------------------------------------------- YAML and overrides

def _key_lines(node: yaml.Node, source: str, key: str = "",
               out: dict[str, str] | None = None) -> dict[str, str]:
    """Map every key path to ``file:line``; a key given twice in one mapping is an error."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k_node, v_node in node.value:
            child = f"{key}.{k_node.value}" if key else str(k_node.value)
            where = f"{source}:{k_node.start_mark.line + 1}"
            if str(k_node.value) in seen:
                raise RecipeError(f"{where}: {child} is given twice; keep one")
            seen.add(str(k_node.value))
            out[child] = where
            _key_lines(v_node, source, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{key}[{i}]"] = f"{source}:{item.start_mark.line + 1}"
            _key_lines(item, source, f"{key}[{i}]", out)
    return out


def _allowed(path: list[str | int]) -> Sequence[str] | None:
    """Keys allowed under ``path`` (``None``: any key, as in ``model.architecture``)."""
    if not path:
        return _TOP_KEYS
    head = path[0]
    if path[:2] == ["model", "architecture"]:
        return None
    if len(path) == 1 and head in _SECTIONS:
        return [f.name for f in fields(_SECTIONS[head])]
    if path == ["method"] or (head == "compare" and len(path) == 2):
        return _METHOD_KEYS
    if head == "domains" and len(path) == 2:
        return _DOMAIN_KEYS
    return ()


def _dotted(parts: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def _apply_override(raw: dict[str, Any], text: str, ctx: _Ctx) -> None:
    """Set ``key.path=value`` (value read as YAML) in the raw recipe."""
    where = f"{ctx.source} (override {text!r})"
    key, eq, value_text = text.partition("=")
    parts: list[str | int] = [int(p[1:-1]) if p.startswith("[") else p
                              for p in re.findall(r"\[\d+\]|[^.\[\]]+", key.strip())]
    if not eq or not parts or _dotted(parts) != key.strip():
        raise RecipeError(f"{where}: an override is key=value; e.g. training.lr=1.0e-4 or method=vanilla")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    node: Any = raw
    for depth, part in enumerate(parts):
        here = _dotted(parts[:depth])
        if isinstance(part, int):
            if not isinstance(node, list) or not 0 <= part < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise RecipeError(f"{where}: {here} has no item [{part}] (it has {size})")
        else:
            allowed = _allowed(parts[:depth])
            if not isinstance(node, dict) or (allowed is not None and part not in allowed):
                hint = _did_you_mean(part, allowed or (), f"{here}." if here else "")
                raise RecipeError(f"{where}: unknown key {_dotted(parts[:depth + 1])}"
                                  + (f"; {hint}" if hint else ""))
        if depth == len(parts) - 1:
            node[part] = value
            break
        child = node[part] if isinstance(part, int) or part in node else None
        if isinstance(child, str) and parts[0] in ("method", "compare", "domains"):
            child = {"source" if parts[0] == "domains" else "name": child}
        node[part] = child = {} if child is None else child
        node = child
    dotted = _dotted(parts)
    for k in [k for k in ctx.where if k == dotted or k.startswith((dotted + ".", dotted + "["))]:
        del ctx.where[k]
    ctx.where[dotted] = where
    ctx.overridden.add(dotted)


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML file, apply ``key.path=value`` overrides and check it (no model, no data)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: no such recipe file; recipes live in recipes/, e.g. recipes/tiny.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        where = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), source)
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark or err.context_mark, ""
        if err.context and err.context_mark and err.context_mark.line != mark.line:
            context = f" ({err.context} at line {err.context_mark.line + 1})"
        raise RecipeError(f"{source}:{mark.line + 1}: YAML syntax error: {err.problem or err.context}"
                          f"{context}; fix the indentation, a missing ':' or an unclosed bracket or quote "
                          "there") from None
    if raw is None:
        raise RecipeError(f"{source}: the recipe is empty; start from recipes/tiny.yaml")
    ctx = _Ctx(source, where)
    raw = copy.deepcopy(raw)
    if isinstance(raw, dict):
        for text_ in overrides:
            _apply_override(raw, text_, ctx)
        raw["source_path"] = source
    return _build(raw, ctx, Path(os.path.abspath(path.parent)), f"runs/{path.stem}")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML (loads back to an equal recipe)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)

