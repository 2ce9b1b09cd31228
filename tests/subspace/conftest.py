"""Fixtures for the subspace tests: the suite's tiny peft Llama (nothing downloads)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def tiny_lora_llama(tiny_peft: tuple[Any, Any]) -> Any:
    """The shared tiny peft model (2-layer random Llama, hidden 64, LoRA r=4 on q_proj, v_proj)."""
    return tiny_peft[0]
