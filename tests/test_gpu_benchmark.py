"""benchmarks/gpu_7b.py stays runnable: its optimizer set-up works on CPU; without CUDA it exits 0."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_7b", REPO / "benchmarks" / "gpu_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routed_optimizer_has_seven_earlier_domains_and_steps(tiny_factory):
    from peft import LoraConfig, get_peft_model

    bench = load_benchmark()
    model, _ = tiny_factory()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=bench.TARGETS))
    opt = bench.routed_optimizer(model)
    assert opt.bank.domains() == [f"earlier{d}" for d in range(bench.EARLIER)]
    assert opt.param_groups[0]["routing"] == "decoupled"
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any("projection/overlap" in k for k in opt.metrics())


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_7b.py"), "--out",
                           str(tmp_path / "gpu.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.md").exists()
