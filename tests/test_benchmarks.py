"""The benchmark scripts run (quick settings, tiny model) and write the performance page; no
timing is asserted here: speed is measured by `make bench`, never in the test suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_performance_quick_writes_the_page(tmp_path, test_cache_dir):
    page = tmp_path / "performance.md"
    env = {**os.environ, "LORA_CL_CACHE": str(test_cache_dir)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "performance.py"), "--quick",
                           "--out", str(page)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert "## Targets" in text and "| verdict |" in text and "![step-time ratios]" in text
    for name in ("optimizer_step", "trainer_step", "basis_build"):
        doc = json.loads((tmp_path / "performance" / f"{name}.json").read_text())
        assert doc["benchmark"] == name
    assert (tmp_path / "performance" / "ratios.png").stat().st_size > 1000
    assert "Where the projection step's time goes" in text
    assert "ATen (and bitsandbytes) compute ops per `step()`" in text
    # the guard decides on the device with fp32 and with 8-bit states
    assert ("| host syncs per step(), default guard: no modifier; projection; 8-bit states |  | 0 | 0; 0; 0 |"
            in text)
    assert "Exact GPM (activation (gpm)) runs its sample of examples through the model" in text
    ops = json.loads((tmp_path / "performance" / "optimizer_step.json").read_text())["ops_per_step"]
    one_chunk = next(v for k, v in ops.items() if "one chunk per shape" in k)
    default = ops["RoutedAdamW decoupled, no modifier (fused path)"]
    assert 0 < ops["torch AdamW fused=True"] < default < one_chunk
