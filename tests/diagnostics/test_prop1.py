"""Proposition 1 within 8%, and the CLI that reports it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lora_cl.diagnostics import old_direction_lr, overlap, run_prop1, v_share_in_subspace
from lora_cl.diagnostics.prop1 import DEFAULT_ALPHAS


def test_prop1_aligned_basis_within_8_percent_at_8_alphas():
    points = run_prop1(DEFAULT_ALPHAS, steps=600)
    assert [p.alpha for p in points] == list(DEFAULT_ALPHAS)
    for p in points:
        assert p.lr_rel_error < 0.08, p
        assert p.v_rel_error < 0.08, p
        assert p.lr_ratio > 1.0  # shared inflates the old-direction LR


def test_prop1_rotated_basis_is_diluted_but_still_inflated():
    points = run_prop1((0.5,), steps=800, basis="rotated")
    assert 1.0 < points[0].lr_ratio < points[0].lr_ratio_predicted


def test_probes_on_known_values():
    U = torch.eye(4)[:, :2]
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert overlap(g, U) == pytest.approx(25 / 26)
    v = torch.tensor([[4.0, 4.0, 1.0, 1.0]])
    # step -> infinity: no bias correction; eta along e1 = lr / (2 + eps)
    assert old_direction_lr(v, U, step=1e9, lr=1.0, beta2=0.999, eps=0.0) == pytest.approx(0.5)
    assert v_share_in_subspace(v, U, step=1e9, beta2=0.999) == pytest.approx(0.8)


@pytest.mark.slow
def test_cli_writes_json_and_png_and_exit_code(tmp_path):
    out = tmp_path / "p1"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_cl.cli", "diagnose", "prop1", "--out", str(out),
         "--steps", "600", "--basis", "aligned"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "within the 8% tolerance" in proc.stdout
    data = json.loads((out / "prop1.json").read_text())
    assert len(data["results"]["aligned"]) == 8
    assert (out / "prop1.png").stat().st_size > 10_000
    # an impossible tolerance makes it fail loudly
    proc = subprocess.run(
        [sys.executable, "-m", "lora_cl.cli", "diagnose", "prop1", "--out", str(out),
         "--steps", "300", "--basis", "rotated", "--tolerance", "0.01"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "NOT within" in proc.stdout


@pytest.mark.parametrize("state_bits", [32, 8])
def test_optimizer_probes_read_fp32_and_8bit_states_alike(state_bits):
    """The callback's probes read v through RoutedAdamW.moments, so 8-bit states work too.

    fp32: the probes equal the probe functions applied to the raw ``exp_avg_sq`` state; 8-bit:
    they are within 5% of the fp32 run's. Both runs project (shared routing moves the probe).
    """
    from lora_cl import Projection, RoutedAdamW, SubspaceBank
    from lora_cl.diagnostics import optimizer_probes
    from lora_cl.diagnostics.probes import old_direction_lr, v_energy_in_subspace, v_share_in_subspace

    def run(bits, routing="decoupled"):
        gen = torch.Generator().manual_seed(0)
        p = (torch.randn(16, 512, generator=gen) * 0.1).requires_grad_()
        bank = SubspaceBank()
        U = torch.eye(512)[:, :8]  # aligned: the probes measure v along coordinates
        bank.add("old", "a", U)
        opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing=routing,
                          modifiers=[Projection(bank, 0.9, weighted=False)], lr=1e-3,
                          state_bits=bits, min_8bit_size=4096)
        for _ in range(5):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g + 20 * (g @ U) @ U.T  # most of the gradient in the old subspace
            opt.step()
        return opt, p, U, optimizer_probes(opt, bank)

    opt, p, U, got = run(state_bits)
    assert set(got) == {"probe/v_share_old", "probe/old_direction_lr", "probe/v_energy_old"}
    if state_bits == 32:
        state = opt.state[p]
        step, v = float(state["step"]), state["exp_avg_sq"]
        want = {"probe/v_share_old": v_share_in_subspace(v, U, step, 0.999),
                "probe/old_direction_lr": old_direction_lr(v, U, step, 1e-3, 0.999, 1e-8),
                "probe/v_energy_old": v_energy_in_subspace(v, U, step, 0.999)}
    else:
        want = run(32)[3]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6 if state_bits == 32 else 0.05)
    shared = run(state_bits, routing="shared")[3]  # g~ in v: the old share of v falls ~100x
    assert shared["probe/v_share_old"] < 0.1 * got["probe/v_share_old"]
    assert shared["probe/v_energy_old"] < 0.1 * got["probe/v_energy_old"]  # R_v > 10


def test_optimizer_probes_measure_each_protected_side():
    """With both LoRA factors protected (lora_B on its output side) the probes measure both sides:
    the fan-out side's keys are the probe functions of the transposed v along the out-side basis."""
    from lora_cl import Projection, RoutedAdamW, SubspaceBank
    from lora_cl.diagnostics import optimizer_probes
    from lora_cl.diagnostics.probes import old_direction_lr, v_energy_in_subspace, v_share_in_subspace

    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(8, 256, generator=gen) * 0.1).requires_grad_()  # lora_A-like: r x d_in
    b = (torch.randn(256, 8, generator=gen) * 0.1).requires_grad_()  # lora_B-like: d_out x r
    bank = SubspaceBank()
    U_in, U_out = torch.eye(256)[:, :16], torch.eye(256)[:, 16:40]
    bank.add("old", "a", U_in, side="in")
    bank.add("old", "b", U_out, side="out")
    opt = RoutedAdamW([{"params": [a, b], "param_names": ["a", "b"]}], lr=1e-3,
                      modifiers=[Projection(bank, 0.5, side="both")])
    for _ in range(4):
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        opt.step()
    got = optimizer_probes(opt, bank)
    va, vb = opt.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"]
    want = {"probe/v_share_old": v_share_in_subspace(va, U_in, 4, 0.999),
            "probe/old_direction_lr": old_direction_lr(va, U_in, 4, 1e-3, 0.999, 1e-8),
            "probe/v_share_old_out": v_share_in_subspace(vb.T, U_out, 4, 0.999),
            "probe/old_direction_lr_out": old_direction_lr(vb.T, U_out, 4, 1e-3, 0.999, 1e-8),
            "probe/v_energy_old": v_energy_in_subspace(va, U_in, 4, 0.999),
            "probe/v_energy_old_out": v_energy_in_subspace(vb.T, U_out, 4, 0.999)}
    assert got == pytest.approx(want, rel=1e-6)
    in_only = optimizer_probes(opt, bank, sides=("in",))
    assert in_only.keys() == {"probe/v_share_old", "probe/old_direction_lr", "probe/v_energy_old"}
