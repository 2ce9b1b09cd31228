"""Shared test setup: offline hub, two threads, and fixtures for the tiny and real models."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from ci_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks)

# Nothing in the tests may reach a hub; huggingface_hub reads these once, at its import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
torch.set_num_threads(2)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(scope="session")
def test_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide ``LORA_CL_CACHE`` for fast tests (keeps the 3 s tokenizer extraction)."""
    return tmp_path_factory.mktemp("lora-cl-cache")


@pytest.fixture
def lora_cl_cache(test_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``LORA_CL_CACHE`` at the session's temporary cache for one test."""
    monkeypatch.setenv("LORA_CL_CACHE", str(test_cache_dir))
    return test_cache_dir


@pytest.fixture(scope="session")
def tiny_factory(test_cache_dir: Path) -> Callable[[], ModelAndTokenizer]:
    """Make fresh deep copies of the tiny random Llama and the real SmolLM2 tokenizer."""
    from lora_cl.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CL_CACHE", str(test_cache_dir))
        model, tokenizer = load_model("tiny")

    def make() -> ModelAndTokenizer:
        return copy.deepcopy(model), copy.deepcopy(tokenizer)

    return make


@pytest.fixture
def tiny_model_and_tokenizer(tiny_factory: Callable[[], ModelAndTokenizer]) -> ModelAndTokenizer:
    """The tiny model and tokenizer, private to this test (mutate freely)."""
    return tiny_factory()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The cached HF-format SmolLM2-135M dir, shared across sessions (``$LORA_CL_CACHE`` or
    ``~/.cache/lora-cl``); the first use ever builds it (~20 s). For ``slow`` tests only."""
    from lora_cl.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_factory(smollm2_path: Path) -> Callable[[], ModelAndTokenizer]:
    """Load a fresh SmolLM2-135M and tokenizer from the shared cache (~0.2 s per call)."""
    from lora_cl.models import load_model

    return lambda: load_model(str(smollm2_path))
