"""Typed recipes: one YAML file says which model, data stream, LoRA, method(s) and training to run.

>>> recipe = load_recipe("recipes/tiny.yaml", ["training.lr=1.0e-4", "method=vanilla"])
>>> check_recipe(recipe)          # offline: data paths, method, LoRA targets on a meta-device model

Every problem is one :class:`RecipeError` line, ``<file>:<line>: <what is wrong>; <how to fix it>``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_cl.methods import MethodError, MethodSpec, resolve_method

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PretrainedConfig, PreTrainedModel

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit", "8bit")
TRAINERS = ("trainer", "sft")
NONFINITE = ("stop", "skip")
METRICS = ("auto", "loss", "exact_match", "rougeL")
BUILTIN_PREFIXES = ("debian", "qa")


class RecipeError(ValueError):
    """A recipe that cannot run, in one line: where, what is wrong and the fix."""


@dataclass
class ModelConfig:
    """The base model: a built-in (``smollm2-135m``, ``tiny``), a local directory or a hub id."""

    name: str = "smollm2-135m"
    dtype: str = "float32"
    quantization: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # transformers config kwargs (with "model_type") so hub-id recipes check and plan offline
    architecture: dict | None = None


@dataclass
class LoraSettings:
    """The LoRA adapter; keys mirror ``peft.LoraConfig``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] | None = None

    def peft_config(self) -> LoraConfig:
        """The ``peft.LoraConfig`` (task CAUSAL_LM)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=("all-linear" if self.target_modules == ["all-linear"]
                                          else list(self.target_modules)),
                          modules_to_save=None if self.modules_to_save is None
                          else list(self.modules_to_save),
                          task_type="CAUSAL_LM")


@dataclass
class MethodChoice:
    """A method preset by name, with :class:`~lora_cl.methods.MethodSpec` fields overridden."""

    name: str = "ogp"
    label: str | None = None
    overrides: dict = field(default_factory=dict)

    def spec(self) -> MethodSpec:
        """The resolved :class:`MethodSpec`; an unknown name or bad field raises :class:`RecipeError`."""
        try:
            return resolve_method(self.name, self.overrides)
        except MethodError as err:
            raise RecipeError(f"method {self.run_label!r}: {err}") from None

    @property
    def run_label(self) -> str:
        """``label``, else the name plus the sorted overrides (``gpm-routing=decoupled``)."""
        if self.label:
            return self.label
        if not self.overrides:
            return self.name
        return self.name + "-" + ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))

    def to_dict(self) -> str | dict[str, Any]:
        """The bare name when nothing is overridden, else ``{name, label?, **overrides}``."""
        if self.label is None and not self.overrides:
            return self.name
        out: dict[str, Any] = {"name": self.name}
        if self.label is not None:
            out["label"] = self.label
        return {**out, **self.overrides}


@dataclass
class DomainConfig:
    """One domain of the stream: ``debian:<domain>``, ``qa:<task>`` or a user data path."""

    source: str
    name: str | None = None
    steps: int | None = None
    eval_source: str | None = None

    @property
    def builtin(self) -> bool:
        """Whether the source is a built-in Debian text domain or Q/A task."""
        return is_builtin(self.source)

    @property
    def resolved_name(self) -> str:
        """``name``, else the part after ``:`` of a built-in, else the file stem."""
        if self.name:
            return self.name
        return self.source.partition(":")[2] if self.builtin else Path(self.source).stem


@dataclass
class DataConfig:
    seq_len: int = 128
    train_examples: int | None = None
    eval_examples: int = 16
    seed: int = 0


@dataclass
class TrainingConfig:
    trainer: str = "trainer"
    steps_per_domain: int = 50
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"
    max_grad_norm: float = 1.0
    bf16: bool = False
    fp16: bool = False
    seed: int = 0
    save_steps: int = 25
    logging_steps: int = 5
    nonfinite: str = "stop"
    deepspeed: str | None = None
    fused_loss: bool = False  # trainer: "trainer" only; trl's SFTTrainer always fuses the LM head


@dataclass
class EvalConfig:
    batch_size: int = 8
    generate: bool = True
    max_new_tokens: int = 32
    metric: str = "auto"


@dataclass
class Recipe:
    """A whole continual-finetuning job; :func:`load_recipe` builds it from YAML."""

    domains: list[DomainConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    method: MethodChoice = field(default_factory=MethodChoice)
    compare: list[MethodChoice] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/recipe"
    source_path: str | None = None
    # key path -> "file:line" (or the command-line override) for error messages
    _where: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _ctx(self) -> _Ctx:
        return _Ctx(self.source_path or "<recipe>", self._where)

    def methods(self) -> list[MethodChoice]:
        """``[method, *compare]``; two with the same run label raise :class:`RecipeError`."""
        choices = [self.method, *self.compare]
        seen: dict[str, int] = {}
        for i, choice in enumerate(choices):
            j = seen.setdefault(choice.run_label, i)
            if j != i:
                raise self._ctx().error(
                    _method_key(i), f"{_method_key(i)} runs as {choice.run_label!r}, like {_method_key(j)}",
                    "give one of them a distinct `label:`")
        return choices

    def domain_names(self) -> list[str]:
        """The domains' names, in stream order; duplicates raise :class:`RecipeError`."""
        names = [d.resolved_name for d in self.domains]
        for i, name in enumerate(names):
            if name in names[:i]:
                j = names.index(name)
                raise self._ctx().error(f"domains[{i}]", f"domains[{i}] is named {name!r}, like domains[{j}]",
                                        f"give it a distinct `name:` (domains: - {{source: ..., name: "
                                        f"{name}-2}})")
        return names

    def steps_for(self, i: int) -> int:
        """Training steps of domain ``i``: its own ``steps`` or ``training.steps_per_domain``."""
        steps = self.domains[i].steps
        return self.training.steps_per_domain if steps is None else steps

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready) that :func:`recipe_from_dict` turns back into this recipe."""
        return {
            "domains": [{k: v for k, v in asdict(d).items() if v is not None} for d in self.domains],
            "model": asdict(self.model), "lora": asdict(self.lora),
            "method": self.method.to_dict(), "compare": [c.to_dict() for c in self.compare],
            "data": asdict(self.data), "training": asdict(self.training), "eval": asdict(self.eval),
            "output_dir": self.output_dir, "source_path": self.source_path,
        }


_SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig,
                              "training": TrainingConfig, "eval": EvalConfig}
_TOP_KEYS = tuple(f.name for f in fields(Recipe) if f.init)
_METHOD_KEYS = ("name", "label", *(f.name for f in fields(MethodSpec) if f.name != "name"))
_DOMAIN_KEYS = tuple(f.name for f in fields(DomainConfig))


def is_builtin(source: str) -> bool:
    """``debian:<name>`` and ``qa:<name>`` are built-in sources; anything else is a path."""
    prefix, _, name = source.partition(":")
    return prefix in BUILTIN_PREFIXES and bool(name)


def _method_key(i: int) -> str:
    return "method" if i == 0 else f"compare[{i - 1}]"


# TrainingArguments / LoraConfig names people type from habit -> ours
_ALIASES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "max_steps": "steps_per_domain",
            "lr_scheduler_type": "scheduler", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lora_r": "r", "rank": "r", "max_length": "seq_len", "max_seq_length": "seq_len"}


def _did_you_mean(word: Any, options: Sequence[str], prefix: str = "") -> str | None:
    alias = _ALIASES.get(str(word))
    if alias in options:
        return f"did you mean {prefix}{alias}?"
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {prefix}{close[0]}?" if close else None


class _Ctx:
    """Turns a key path (``domains[2].source``) into ``file:line`` for error messages."""

    def __init__(self, source: str, where: dict[str, str] | None = None) -> None:
        self.source = source
        self.where = {} if where is None else where
        self.overridden: set[str] = set()

    def loc(self, key: str) -> str:
        while key:
            if key in self.where:
                return self.where[key]
            key = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return self.source

    def from_override(self, key: str) -> bool:
        return any(key == k or key.startswith((k + ".", k + "[")) for k in self.overridden)

    def error(self, key: str, problem: str, fix: str | None = None) -> RecipeError:
        return RecipeError(f"{self.loc(key)}: {problem}" + (f"; {fix}" if fix else ""))


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
    training = sections["training"]
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


# ---------------------------------------------------------------- checks

def _choice(ctx: _Ctx, key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        hint = _did_you_mean(value, [a for a in allowed if a]) if isinstance(value, str) else None
        raise ctx.error(key, f"{key} must be one of {shown}, got {value!r}", hint)


def _check_values(recipe: Recipe, ctx: _Ctx) -> None:
    """Every check that needs neither the data nor the model."""
    from transformers import SchedulerType

    from lora_cl.data import UnknownNameError, resolve_source

    m, t, e, d, lo = recipe.model, recipe.training, recipe.eval, recipe.data, recipe.lora
    for key, value, allowed in (
            ("model.dtype", m.dtype, DTYPES), ("model.quantization", m.quantization, QUANTIZATIONS),
            ("training.trainer", t.trainer, TRAINERS), ("training.nonfinite", t.nonfinite, NONFINITE),
            ("eval.metric", e.metric, METRICS),
            ("training.scheduler", t.scheduler, [s.value for s in SchedulerType])):
        _choice(ctx, key, value, allowed)
    positive = {"data.seq_len": d.seq_len, "data.train_examples": d.train_examples,
                "data.eval_examples": d.eval_examples, "training.steps_per_domain": t.steps_per_domain,
                "training.batch_size": t.batch_size, "training.grad_accum": t.grad_accum,
                "training.save_steps": t.save_steps, "training.logging_steps": t.logging_steps,
                "training.lr": t.lr, "eval.batch_size": e.batch_size, "eval.max_new_tokens": e.max_new_tokens,
                "lora.r": lo.r, "lora.alpha": lo.alpha,
                **{f"domains[{i}].steps": dom.steps for i, dom in enumerate(recipe.domains)}}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ctx.error(key, f"{key} must be positive, got {value}")
    for key, value in (("training.warmup_steps", t.warmup_steps), ("training.weight_decay", t.weight_decay),
                       ("training.max_grad_norm", t.max_grad_norm)):
        if value < 0:
            raise ctx.error(key, f"{key} must be >= 0, got {value}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ctx.error("lora.dropout", f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        raise ctx.error("lora.target_modules", "lora.target_modules is empty", "e.g. [q_proj, v_proj]")
    if t.bf16 and t.fp16:
        raise ctx.error("training.fp16", "training.bf16 and training.fp16 are both true",
                        "set only one (bf16 on Ampere or newer GPUs, fp16 on older ones)")
    for i, choice in enumerate(recipe.methods()):
        try:
            resolve_method(choice.name, choice.overrides)
        except MethodError as err:
            key = _method_key(i)
            named = [k for k in choice.overrides if re.search(rf"\b{k}\b", str(err))]
            raise ctx.error(f"{key}.{named[0]}" if named else key, f"{key}: {err}") from None
    for i, dom in enumerate(recipe.domains):
        try:
            resolve_source(dom.source)
        except UnknownNameError as err:
            raise ctx.error(f"domains[{i}].source", f"domains[{i}].source: {err}",
                            "`lora-cl data list` shows the built-in sources") from None
    recipe.domain_names()


def check_recipe(recipe: Recipe, *, check_sources: bool = True, check_model: bool = True) -> list[str]:
    """Check ``recipe`` offline; return notes for people, raise :class:`RecipeError` on a problem.

    ``check_sources``: user data paths and the DeepSpeed file exist. ``check_model``: every LoRA
    target names a linear layer of the model, built on the meta device from its config.
    """
    ctx = recipe._ctx()
    _check_values(recipe, ctx)
    notes = [f"{len(recipe.domains)} domains: {', '.join(recipe.domain_names())}",
             f"methods: {', '.join(c.run_label for c in recipe.methods())}"]
    if check_sources:
        for i, dom in enumerate(recipe.domains):
            for key, path in ((f"domains[{i}].source", dom.source),
                              (f"domains[{i}].eval_source", dom.eval_source)):
                if path is not None and not is_builtin(path) and not Path(path).exists():
                    raise ctx.error(key, f"{key}: data path {path} does not exist",
                                    "create it (a recipe's header says how) or fix the path; relative paths "
                                    "resolve against the recipe's folder")
        if recipe.training.deepspeed is not None:
            _check_deepspeed(recipe.training.deepspeed, ctx)
    else:
        notes.append("data paths and the DeepSpeed file not checked (check_sources=False)")
    if recipe.model.quantization is not None and recipe.model.dtype == "float32":
        notes.append(f"model.quantization {recipe.model.quantization} with dtype float32: "
                     "non-quantized layers stay in float32")
    if check_model:
        notes.append(_check_targets(recipe, ctx))
    return notes


def _check_deepspeed(path: str, ctx: _Ctx) -> None:
    key = "training.deepspeed"
    if not Path(path).is_file():
        raise ctx.error(key, f"{key}: DeepSpeed config {path} does not exist",
                        "point it at a JSON such as deepspeed_configs/zero2.json, or remove the key")
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ctx.error(key, f"{key}: {path} is not valid JSON ({err})") from None


# ---------------------------------------------------------------- the model, offline

def model_config(recipe: Recipe) -> PretrainedConfig:
    """The model's transformers config without loading weights (built-in, local dir, cache or
    ``model.architecture``)."""
    from transformers import AutoConfig, LlamaConfig

    from lora_cl.models import BUILTIN_MODELS, SMOLLM2, architecture_of

    m = recipe.model
    ctx = recipe._ctx()
    if m.name in BUILTIN_MODELS:
        a = architecture_of(m.name)
        extra = {"max_position_embeddings": 8192, "rope_theta": 100000.0} if m.name == SMOLLM2 else {}
        return LlamaConfig(hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                           num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                           num_key_value_heads=a["kv_heads"], vocab_size=a["vocab"], rms_norm_eps=1e-5,
                           tie_word_embeddings=True, **extra)
    try:
        if Path(m.name).expanduser().is_dir():
            return AutoConfig.from_pretrained(str(Path(m.name).expanduser()),
                                              trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ctx.error("model.name", f"model.name: {m.name} has no readable config.json ({err})") from None
    try:
        return AutoConfig.from_pretrained(m.name, local_files_only=True,
                                          trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError):
        pass
    if m.architecture is None:
        raise ctx.error("model.name", f"model {m.name!r} is not a built-in model, a local directory or "
                        "in the local Hugging Face cache",
                        "add model.architecture (the config.json numbers, with model_type) to check and "
                        "plan offline, or download the model first")
    arch = dict(m.architecture)
    model_type = arch.pop("model_type", None)
    try:
        if not isinstance(model_type, str):
            raise ValueError("model_type is missing")
        return AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError, KeyError) as err:
        raise ctx.error("model.architecture", f"model.architecture is not a transformers config: {err}",
                        "give model_type (e.g. llama) and the config.json fields") from None


def meta_model(recipe: Recipe) -> PreTrainedModel:
    """The recipe's model with every weight on the meta device (no memory, no download)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model_config(recipe)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    model.tie_weights()
    return model


_SUMMARIES: dict[tuple[str, bool], tuple[str, int, tuple[str, ...], tuple[str, ...]]] = {}


def _summary(recipe: Recipe) -> tuple[str, int, tuple[str, ...], tuple[str, ...]]:
    """(class, parameter count, linear-layer names, all module names) of the meta-device model."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    config = model_config(recipe)
    key = (config.to_json_string(use_diff=False), recipe.model.trust_remote_code)
    if key not in _SUMMARIES:  # building a 7B skeleton takes ~1 s; recipes often share one
        model = meta_model(recipe)
        linear = tuple(n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, Conv1D)))
        _SUMMARIES[key] = (type(model).__name__, sum(p.numel() for p in model.parameters()), linear,
                           tuple(n for n, _ in model.named_modules()))
    return _SUMMARIES[key]


def _check_targets(recipe: Recipe, ctx: _Ctx) -> str:
    cls, n_params, linear, modules = _summary(recipe)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    targets = recipe.lora.target_modules
    for t in targets:
        if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in linear):
            hint = _did_you_mean(t, leaves)
            raise ctx.error("lora.target_modules",
                            f"lora.target_modules: {t!r} is not a linear layer of {cls}",
                            (f"{hint} " if hint else "") + f"(linear layers: {', '.join(leaves)})")
    for s in recipe.lora.modules_to_save or ():
        if not any(n == s or n.endswith("." + s) for n in modules):
            raise ctx.error("lora.modules_to_save", f"lora.modules_to_save: {s!r} is not a module of {cls}",
                            "e.g. lm_head or embed_tokens")
    wrapped = len(linear) if "all-linear" in targets else sum(
        any(n == t or n.endswith("." + t) for t in targets) for n in linear)
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    return f"model {cls}: {size} parameters; LoRA wraps {wrapped} linear layers"
