"""In CI a skip for a missing dependency fails the run; locally it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = {
    "test_module_level.py": 'import pytest\npytest.importorskip("no_such_module_lora_cl")\n\n'
                            "def test_never():\n    pass\n",
    "test_in_test.py": "import pytest\n\ndef test_extra():\n"
                       '    pytest.importorskip("no_such_module_lora_cl")\n\n'
                       "def test_data():\n"
                       '    pytest.skip("missing dependency: a Debian package")\n\n'
                       "def test_other_skip():\n"
                       '    pytest.skip("slow on this machine")\n',
}


def run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    for name, text in CASES.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_guard", "-p", "no:cacheprovider",
                           "-rA", "--continue-on-collection-errors", "--rootdir", str(tmp_path),
                           "-c", os.devnull, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_fails_a_skip_for_a_missing_dependency(tmp_path, ci):
    proc = run_pytest(tmp_path, ci)
    assert proc.returncode != 0, proc.stdout
    assert "1 error" in proc.stdout  # the module-level skip, at collection
    assert "FAILED test_in_test.py::test_extra" in proc.stdout
    assert "FAILED test_in_test.py::test_data" in proc.stdout
    assert "SKIPPED" in proc.stdout and "slow on this machine" in proc.stdout  # other skips stay
    assert "make install" in proc.stdout


def test_outside_ci_they_stay_skips(tmp_path):
    proc = run_pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "4 skipped" in proc.stdout
