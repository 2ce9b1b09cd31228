"""Reading a DeepSpeed JSON config: its ZeRO stage and whether it offloads.

One reader for the places that need it: the stream runner (every rank evaluates under ZeRO-3) and
``lora-cl plan``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OFFLOAD_KEYS = ("offload_optimizer", "offload_param")


@dataclass(frozen=True)
class ZeroSettings:
    """What lora-cl reads of ``zero_optimization``: the stage (0 without the section) and whether
    optimizer states or parameters are offloaded (any ``device`` other than ``none``), and where
    the optimizer states go (``offload_optimizer.device``, ``"none"`` when they stay)."""

    stage: int
    offload: bool
    optimizer_offload: str = "none"


def read_zero(config: str | Path | dict[str, Any]) -> ZeroSettings:
    """The ZeRO settings of a DeepSpeed config given as a path or an already parsed dict.

    A missing file raises ``OSError`` and broken JSON ``json.JSONDecodeError`` (a ``ValueError``):
    each caller reports those in its own words.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    zero = (config.get("zero_optimization") or {}) if isinstance(config, dict) else {}
    devices = {key: (zero.get(key) or {}).get("device") or "none" for key in OFFLOAD_KEYS}
    return ZeroSettings(stage=int(zero.get("stage", 0)),
                        offload=any(d != "none" for d in devices.values()),
                        optimizer_offload=devices["offload_optimizer"])
