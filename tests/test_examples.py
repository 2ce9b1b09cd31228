"""Every example script runs on the tiny model (so they never rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_builds_bases():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--model", "tiny",
                           "--steps", "4"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license: last loss" in proc.stdout and "python: last loss" in proc.stdout
    assert "4 bases added" in proc.stdout  # 2 layers x (q, v) lora_A tensors
    assert "'projection/alpha'" in proc.stdout
