"""Shared test setup: offline hub, two threads, and fixtures for the tiny and real models."""

from __future__ import annotations

import copy
import os
import random
import socket
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
# No test writes to the user's ~/.cache: lora-cl's cache (the SmolLM2 dir, built data) and the
# HF caches live in the checkout's git-ignored .cache/ (kept across sessions) unless set.
_CACHE = Path(__file__).resolve().parents[1] / ".cache"
os.environ.setdefault("LORA_CL_CACHE", str(_CACHE / "lora-cl"))
os.environ.setdefault("HF_HOME", str(_CACHE / "huggingface"))
os.environ.setdefault("XDG_CACHE_HOME", str(_CACHE))
torch.set_num_threads(2)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same RNG state (torch, Python, NumPy), whatever ran before."""
    torch.manual_seed(0)
    random.seed(0)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels here
        return
    np.random.seed(0)


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT; torchrun --standalone picks its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def master_port() -> str:
    return str(free_port())


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
def tiny_peft(tiny_factory: Callable[[], ModelAndTokenizer]) -> ModelAndTokenizer:
    """The tiny Llama with LoRA r=4 on q_proj and v_proj (helpers.tiny_peft_model), and its tokenizer."""
    from helpers import tiny_peft_model

    return tiny_peft_model(tiny_factory)


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
