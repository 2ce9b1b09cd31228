"""The recipe schema: typed sections, the :class:`Recipe`, and ``file:line`` error context."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cl.methods import MethodError, MethodSpec, resolve_method

if TYPE_CHECKING:
    from peft import LoraConfig
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit", "8bit")
TRAINERS = ("trainer", "sft")
FINETUNE = ("lora", "full")
NONFINITE = ("stop", "skip")
METRICS = ("auto", "loss", "exact_match", "rougeL")
BUILTIN_PREFIXES = ("debian", "qa")


class RecipeError(ValueError):
    """A recipe that cannot run, in one line: where, what is wrong and the fix."""


@dataclass
class ModelConfig:
    """The base model: a built-in (``smollm2-135m``, ``tiny``, ``scratch-5m``), a local directory or
    a hub id. ``finetune``: ``lora`` (a peft adapter, its factors routed) or ``full`` (every weight
    trained, the linear layers' weights routed: ``param_groups(route="linear")``)."""

    name: str = "smollm2-135m"
    finetune: str = "lora"
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
    """Tokenisation and slicing. ``train_chars`` / ``eval_chars``: the size of built-in ``debian:``
    text domains' fixed train / held-out slices (None: 200,000 / 40,000 characters)."""

    seq_len: int = 128
    train_examples: int | None = None
    eval_examples: int = 16
    seed: int = 0
    train_chars: int | None = None
    eval_chars: int | None = None


@dataclass
class TrainingConfig:
    trainer: str = "trainer"
    steps_per_domain: int = 50
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9      # the TrainingArguments names; RoutedAdamW's betas and eps
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
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
    fsdp: bool = False  # the Trainer's FSDP2 (fully_shard per decoder layer), every rank evaluating
    state_bits: int = 32  # 8: Adam's m and v as 8-bit blockwise states (bitsandbytes' format)
    min_8bit_size: int = 4096  # with state_bits 8, smaller tensors keep fp32 states (bitsandbytes')
    fused_loss: bool = False  # trainer: "trainer" only; trl's SFTTrainer always fuses the LM head

    @property
    def fused_head(self) -> bool:
        """Whether training never builds the b x s x V logits: trl's SFTTrainer, or ``fused_loss``."""
        return self.trainer == "sft" or self.fused_loss


@dataclass
class EvalConfig:
    """Evaluation after every domain. ``general``: a source no domain trains on (``debian:...``,
    ``qa:...`` or a data path) whose held-out examples are scored for the base model and after
    every domain: the general-ability retention TRACE reports, in summary.json and the reports.
    ``probe_every``: training logs between the optimizer probes (``probe/*``: Adam's v and its
    effective learning rate along the protected subspaces; 0: none)."""

    batch_size: int = 8
    generate: bool = True
    max_new_tokens: int = 32
    metric: str = "auto"
    general: str | None = None
    probe_every: int = 10


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


# names that map onto two keys
_SPLIT_ALIASES = {"betas": ("adam_beta1", "adam_beta2"), "adam_betas": ("adam_beta1", "adam_beta2")}
_ALIASES.update({"beta1": "adam_beta1", "beta2": "adam_beta2", "eps": "adam_epsilon",
                 "adam_eps": "adam_epsilon", "epsilon": "adam_epsilon"})


def _did_you_mean(word: Any, options: Sequence[str], prefix: str = "") -> str | None:
    split = _SPLIT_ALIASES.get(str(word))
    if split and all(k in options for k in split):
        return f"did you mean {prefix}{split[0]} and {prefix}{split[1]}?"
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

