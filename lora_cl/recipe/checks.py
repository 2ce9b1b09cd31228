"""Offline checks of a recipe (values, data paths, DeepSpeed file, LoRA targets) and its model on
the meta device."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cl.methods import MethodError, resolve_method
from lora_cl.recipe.schema import (
    DTYPES,
    FINETUNE,
    METRICS,
    NONFINITE,
    QUANTIZATIONS,
    TRAINERS,
    Recipe,
    _Ctx,
    _did_you_mean,
    _method_key,
    is_builtin,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel
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
            ("model.finetune", m.finetune, FINETUNE),
            ("training.trainer", t.trainer, TRAINERS), ("training.nonfinite", t.nonfinite, NONFINITE),
            ("eval.metric", e.metric, METRICS), ("training.state_bits", t.state_bits, (32, 8)),
            ("training.scheduler", t.scheduler, [s.value for s in SchedulerType])):
        _choice(ctx, key, value, allowed)
    positive = {"data.seq_len": d.seq_len, "data.train_examples": d.train_examples,
                "data.eval_examples": d.eval_examples, "training.steps_per_domain": t.steps_per_domain,
                "data.train_chars": d.train_chars, "data.eval_chars": d.eval_chars,
                "training.batch_size": t.batch_size, "training.grad_accum": t.grad_accum,
                "training.save_steps": t.save_steps, "training.logging_steps": t.logging_steps,
                "training.lr": t.lr, "eval.batch_size": e.batch_size, "eval.max_new_tokens": e.max_new_tokens,
                "lora.r": lo.r, "lora.alpha": lo.alpha,
                **{f"domains[{i}].steps": dom.steps for i, dom in enumerate(recipe.domains)}}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ctx.error(key, f"{key} must be positive, got {value}")
    for key, value in (("training.warmup_steps", t.warmup_steps), ("training.weight_decay", t.weight_decay),
                       ("training.min_8bit_size", t.min_8bit_size),
                       ("training.max_grad_norm", t.max_grad_norm), ("eval.probe_every", e.probe_every)):
        if value < 0:
            raise ctx.error(key, f"{key} must be >= 0, got {value}")
    for key, value in (("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ctx.error(key, f"{key} must be in [0, 1), got {value}")
    if t.adam_epsilon < 0:
        raise ctx.error("training.adam_epsilon", f"training.adam_epsilon must be >= 0, got {t.adam_epsilon}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ctx.error("lora.dropout", f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        raise ctx.error("lora.target_modules", "lora.target_modules is empty", "e.g. [q_proj, v_proj]")
    if t.fsdp and t.deepspeed is not None:
        raise ctx.error("training.fsdp", "training.fsdp and training.deepspeed are both set",
                        "shard with one of them: remove training.deepspeed for FSDP2, or training.fsdp "
                        "for DeepSpeed ZeRO")
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
    _check_slices(recipe, ctx)
    if e.general is not None:
        try:
            resolve_source(e.general)
        except UnknownNameError as err:
            raise ctx.error("eval.general", f"eval.general: {err}",
                            "`lora-cl data list` shows the built-in sources") from None
        trained = [i for i, dom in enumerate(recipe.domains) if dom.source == e.general]
        if trained:
            raise ctx.error("eval.general", f"eval.general {e.general} is domains[{trained[0]}], which the "
                            "stream trains on", "general ability is measured on text no domain trains "
                            "on: pick another source")
    if m.finetune == "full" and m.quantization is not None:
        raise ctx.error("model.finetune", f"model.finetune full trains every weight, which a "
                        f"{m.quantization} quantized base cannot", "drop model.quantization, or use "
                        "model.finetune: lora")


def _check_slices(recipe: Recipe, ctx: _Ctx) -> None:
    """data.train_chars / eval_chars size built-in text slices; refuse them where nothing uses them."""
    from lora_cl.data import resolve_source

    d = recipe.data
    for key, value in (("data.train_chars", d.train_chars), ("data.eval_chars", d.eval_chars)):
        if value is None:
            continue
        other = [dom.source for dom in recipe.domains if resolve_source(dom.source).kind != "text"]
        if other:
            raise ctx.error(key, f"{key} sizes the slices of built-in debian: text domains, but "
                            f"{other[0]} is not one", f"drop {key}, or use debian: text domains only")


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
                              (f"domains[{i}].eval_source", dom.eval_source),
                              *((("eval.general", recipe.eval.general),) if i == 0 else ())):
                if path is not None and not is_builtin(path) and not Path(path).exists():
                    fix = ("create it (a recipe's header says how) or fix the path; relative paths "
                           "resolve against the recipe's folder; `lora-cl validate --no-data` checks "
                           "the rest before the data exists")
                    raise ctx.error(key, f"{key}: data path {path} does not exist", fix)
        if recipe.training.deepspeed is not None:
            _check_deepspeed(recipe.training.deepspeed, ctx)
    else:
        notes.append("data paths and the DeepSpeed file not checked (check_sources=False)")
    if recipe.model.quantization is not None and recipe.model.dtype == "float32":
        notes.append(f"model.quantization {recipe.model.quantization} with dtype float32: "
                     "non-quantized layers stay in float32")
    if recipe.training.fused_loss and recipe.training.trainer == "sft":
        notes.append("training.fused_loss: trl's SFTTrainer fuses the LM head anyway; the key only "
                     "changes training.trainer: trainer")
    if recipe.model.finetune == "full":
        notes.append("model.finetune full: every weight trains; the linear layers' weights are routed")
    elif check_model:
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
