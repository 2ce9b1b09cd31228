"""Silence one known-harmless third-party notice, narrowly (nothing else is filtered)."""

from __future__ import annotations

import logging


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend logs, on every import on AVX512-BF16 machines, that an optional
    ``kernels`` package (which downloads kernels from a hub) is missing; lora-cl never uses it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
