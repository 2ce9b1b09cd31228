"""benchmarks/gpu_7b.py stays runnable: its optimizer set-up works on CPU; without CUDA it exits 0."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    # runs on a GPU machine too: the script sees no device when CUDA_VISIBLE_DEVICES is empty
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_7b.py"), "--out",
                           str(tmp_path / "gpu.md")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.md").exists()


def _recomputes(model) -> int:
    """Calls of the first decoder layer's MLP during one forward + backward (2 = checkpointed).

    (The forward is wrapped rather than hooked: module hooks do not fire on the recompute.)
    """
    mlp = model.get_base_model().model.layers[0].mlp
    calls, forward = [], mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    del mlp.forward
    return len(calls)


def test_both_builds_train_with_activation_checkpointing(tmp_path):
    """from_pretrained returns eval mode, where transformers skips checkpointing: build() must not."""
    pytest.importorskip("bitsandbytes")
    bench = load_benchmark()
    config = bench.llama2_7b_config(1, tiny=True)
    bench.save_random(config, str(tmp_path))
    for saved in (None, str(tmp_path)):  # bf16 from the config, 4-bit through bitsandbytes' CPU backend
        model = bench.build(config, saved, "cpu")
        assert model.training
        assert _recomputes(model) == 2


def test_tiny_flow_runs_on_cpu_and_writes_page_and_json(tmp_path):
    out, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    args = ["--tiny", "--device", "cpu", "--layers", "1", "--steps", "1", "--skip-qlora", "--out", str(out),
            "--json", str(js)]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_7b.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(js.read_text())["rows"]["bf16"]
    assert set(rows) == {"lora-cl ogp, 8-bit states", "peft + AdamW(fused)", "plan_gib"}
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] is None for k, r in rows.items() if k != "plan_gib")
    assert "step-time ratio" in out.read_text()


def test_parity_script_on_cpu_is_bitwise_for_every_routing(tmp_path):
    js = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_parity.py"), "--device", "cpu",
                           "--out", str(tmp_path / "parity.md"), "--json", str(js)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(js.read_text())
    assert len(result["adamw"]) == 8 and all(r["max_abs_diff"] == 0.0 for r in result["adamw"])
    assert result["projection"]["max_rel_diff_vs_cpu"] == 0.0
    assert result["row_buffer"] == {"steps": 40, "bitwise_equal_to_cpu": True, "sync_warnings": 0}
    if result["8bit"] is not None:
        assert result["8bit"]["max_rel_norm_diff"] < 5e-3


def test_cross_platform_table_compares_common_finished_cells(tmp_path):
    """Two caches sharing one finished cell (a copy, so every difference is 0) and one not."""
    import shutil

    cache = REPO / "benchmarks" / "reproduction" / "cells-gpu"
    src = next(p.parent for p in sorted(cache.glob("*/*/*/run.json")))
    key = src.relative_to(src.parents[2])
    shutil.copytree(src, tmp_path / "a" / key)
    shutil.copytree(src, tmp_path / "b" / key)
    shutil.copytree(src, tmp_path / "b" / key.parent / "other-s9")
    out = tmp_path / "x.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cross_platform_cells.py"), "--a",
                           str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "present in both caches: 1." in text and f"| {key} |" in text and "| 0 | 0 |" in text


def test_gpu_checks_fit_one_device_call_performance_rows_first(tmp_path):
    """benchmarks/gpu_checks.sh shares one deadline (GPU_CHECKS_SECONDS) among its steps: the
    optimizer-step and 7B rows run first, each step's limit is cut to the time left, and a step with
    under 30 s left is skipped, saying so, so the script returns inside one device call. The
    interpreter is a stand-in that logs its arguments and takes 10 s per benchmark: what is tested
    is the script's order and clock, not the benchmarks (their own tests are above)."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\n"
                    f'echo "$*" >> "{log}"\n'
                    'case "$*" in *benchmarks/*) sleep 10 ;; esac\n'
                    '[ "$1" = "-c" ] && echo 1\n'
                    "exit 0\n")
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "GPU_CHECKS_SECONDS": "45", "SKIP_SMOKE": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    calls = [line for line in log.read_text().splitlines() if "benchmarks/" in line]
    assert [c.split()[0] for c in calls] == ["benchmarks/optimizer_step.py", "benchmarks/gpu_7b.py"]
    assert "== optimizer step (limit 45s)" in proc.stdout
    assert "== 7B (limit 35s)" in proc.stdout or "== 7B (limit 34s)" in proc.stdout, proc.stdout
    for skipped in ("parity", "FSDP2 parity", "ZeRO-3 stream parity", "FSDP2 stream parity"):
        assert f"== {skipped}: skipped" in proc.stdout, proc.stdout
    assert proc.returncode == 1  # a skipped step is not a pass
