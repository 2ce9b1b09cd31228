"""The lora-cl command line: help, data listing, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lora_cl.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_help_and_version():
    proc = cli("--help")
    assert proc.returncode == 0 and "diagnose" in proc.stdout and "data" in proc.stdout
    assert cli("--version").stdout.startswith("lora-cl ")


def test_data_list_names_the_default_streams():
    proc = cli("data", "list")
    assert proc.returncode == 0
    assert "default 8-domain stream: austen kjv gcide fortunes_de" in proc.stdout
    assert "qa:<name>" in proc.stdout and "capitals" in proc.stdout
    assert "kernels-community" not in proc.stderr  # the bitsandbytes notice is filtered


def test_data_build_unknown_name_suggests_the_right_one():
    proc = cli("data", "build", "debian:austn")
    assert proc.returncode == 2
    assert "Did you mean 'austen'" in proc.stderr


def test_data_build_refuses_user_paths():
    proc = cli("data", "build", "my_notes.txt")
    assert proc.returncode == 2 and "not a built-in source" in proc.stderr
