"""Projection algebra and strength schedules."""

from __future__ import annotations

import pytest
import torch
from helpers import grad_batch

from lora_cl import FixedStrength, OverlapAdaptiveStrength, Projection, SubspaceBank


def orth(d, k, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return q


def batch_of(grads, names=None, step=1):
    return grad_batch(grads, names, step=step)


def test_hard_projection_removes_basis_component_exactly():
    U = orth(32, 6)
    bank = SubspaceBank()
    bank.add("d0", "t0", U)
    g = torch.randn(4, 32)
    (gt,) = Projection(bank, 1.0, weighted=False)(batch_of([g]))
    torch.testing.assert_close(gt @ U, torch.zeros(4, 6), atol=1e-6, rtol=0)
    # the complement is untouched
    P_perp = torch.eye(32) - U @ U.T
    torch.testing.assert_close(gt @ P_perp, g @ P_perp, atol=1e-6, rtol=0)


def test_alpha_zero_is_identity_same_object():
    bank = SubspaceBank()
    bank.add("d0", "t0", orth(16, 3))
    g = torch.randn(2, 16)
    out = Projection(bank, 0.0)(batch_of([g]))
    assert out[0] is g


def test_weighted_projection_matches_formula_and_overlap():
    U = orth(20, 4)
    s = torch.tensor([1.0, 0.5, 0.25, 0.1])
    bank = SubspaceBank()
    bank.add("d0", "t0", U, s)
    g = torch.randn(3, 20)
    proj = Projection(bank, FixedStrength(0.6), weighted=True)
    (gt,) = proj(batch_of([g]))
    expected = g - 0.6 * g @ U @ torch.diag(s) @ U.T
    torch.testing.assert_close(gt, expected, atol=1e-6, rtol=1e-5)
    overlap = (g @ U).square().sum() / g.square().sum()
    assert proj.metrics()["overlap"] == pytest.approx(float(overlap), rel=1e-5)
    assert proj.metrics()["alpha"] == 0.6


def test_out_side_and_both_sides():
    V = orth(12, 3, seed=1)   # output space (fan-out 12)
    U = orth(10, 2, seed=2)   # input space (fan-in 10)
    bank = SubspaceBank()
    bank.add("d0", "w", V, side="out")
    bank.add("d0", "w", U, side="in")
    g = torch.randn(12, 10)
    (g_out,) = Projection(bank, 1.0, weighted=False, side="out")(batch_of([g], ["w"]))
    torch.testing.assert_close(V.T @ g_out, torch.zeros(3, 10), atol=1e-6, rtol=0)
    (g_both,) = Projection(bank, 1.0, weighted=False, side="both")(batch_of([g], ["w"]))
    torch.testing.assert_close(V.T @ g_both, torch.zeros(3, 10), atol=1e-6, rtol=0)
    torch.testing.assert_close(g_both @ U, torch.zeros(12, 2), atol=1e-6, rtol=0)
    expected = (torch.eye(12) - V @ V.T) @ g @ (torch.eye(10) - U @ U.T)
    torch.testing.assert_close(g_both, expected, atol=1e-5, rtol=1e-5)


def test_one_d_tensors_and_tensors_without_basis_pass_through():
    bank = SubspaceBank()
    bank.add("d0", "t0", orth(8, 2))
    bias, other = torch.randn(8), torch.randn(3, 8)
    out = Projection(bank, 1.0)(batch_of([bias, other], ["t0", "t1"]))
    assert out[0] is bias and out[1] is other


def test_dimension_mismatch_is_a_clear_error():
    bank = SubspaceBank()
    bank.add("d0", "t0", orth(8, 2))
    with pytest.raises(ValueError, match="has dimension 8 but the tensor's in-dimension is 9"):
        Projection(bank, 1.0)(batch_of([torch.randn(2, 9)]))


def test_overlap_adaptive_ema_and_reset():
    strength = OverlapAdaptiveStrength(alpha_max=0.5, beta=0.9)
    s = [torch.tensor(0.4)]
    a1 = strength.update(["a"], s)[0]
    # sbar_1 = 0.1 * 0.4 = 0.04 -> alpha = 0.5 * 0.96
    assert float(a1) == pytest.approx(0.48)
    a2 = strength.update(["a"], s)[0]
    # sbar_2 = 0.9*0.04 + 0.1*0.4 = 0.076
    assert float(a2) == pytest.approx(0.5 * (1 - 0.076))
    assert strength.current_overlap == pytest.approx(0.4)
    strength.reset()
    assert strength.current_alpha == 0.5 and strength.smoothed_overlap is None
    a3 = strength.update(["a"], [torch.tensor(1.0)])[0]
    assert float(a3) == pytest.approx(0.5 * 0.9)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_bias_corrected_overlap_gives_the_steady_state_alpha_from_step_one(scope):
    """ogp-debiased: with a constant overlap s, alpha = alpha_max (1 - s) at every step, where the
    paper's uncorrected EMA starts near alpha_max and takes ~1/(1 - beta) steps to get there."""
    plain = OverlapAdaptiveStrength(alpha_max=0.5, beta=0.98, scope=scope)
    fixed = OverlapAdaptiveStrength(alpha_max=0.5, beta=0.98, scope=scope, bias_correction=True)
    s = [torch.tensor(0.6), torch.tensor(0.6)]
    for t in range(1, 51):
        a_plain, a_fixed = plain.update(["a", "b"], s)[0], fixed.update(["a", "b"], s)[0]
        assert float(a_fixed) == pytest.approx(0.5 * 0.4, rel=1e-5)
        assert float(a_plain) == pytest.approx(0.5 * (1 - 0.6 * (1 - 0.98**t)), rel=1e-5)
    assert float(a_plain) > 0.3  # after 50 steps the uncorrected alpha is still far from 0.2
    assert fixed.state_dict()["sbar"].keys() == plain.state_dict()["sbar"].keys()  # same EMA state
    fixed.reset()
    assert float(fixed.update(["a", "b"], [torch.tensor(0.1)] * 2)[0]) == pytest.approx(0.45)
    assert "bias_correction=True" in repr(fixed)


def test_bias_correction_needs_the_overlap_strength():
    from lora_cl import MethodError, resolve_method

    assert resolve_method("ogp-debiased").bias_correction
    with pytest.raises(MethodError, match="bias_correction=True corrects the overlap EMA"):
        resolve_method("adam-nscl", {"bias_correction": True})


def test_overlap_adaptive_global_vs_tensor_scope_and_warmup():
    glob = OverlapAdaptiveStrength(alpha_max=1.0, beta=0.0, warmup=1)
    assert glob.update(["a", "b"], [torch.tensor(0.2), torch.tensor(0.6)]) == [0.0, 0.0]
    a, b = glob.update(["a", "b"], [torch.tensor(0.2), torch.tensor(0.6)])
    assert float(a) == float(b) == pytest.approx(0.6)  # 1 - mean(0.2, 0.6)
    per = OverlapAdaptiveStrength(alpha_max=1.0, beta=0.0, scope="tensor")
    a, b = per.update(["a", "b"], [torch.tensor(0.2), torch.tensor(0.6)])
    assert float(a) == pytest.approx(0.8) and float(b) == pytest.approx(0.4)


def test_projection_resets_strength_on_domain_start():
    bank = SubspaceBank()
    bank.add("d0", "t0", orth(8, 2))
    proj = Projection(bank, OverlapAdaptiveStrength(beta=0.5))
    proj(batch_of([torch.randn(2, 8)]))
    assert proj.strength.steps == 1
    proj.on_domain_start("d1")
    assert proj.strength.steps == 0 and proj.strength.sbar == {}


@pytest.mark.parametrize("bad", [dict(alpha_max=1.5), dict(beta=1.0), dict(warmup=-1),
                                 dict(scope="layer")])
def test_strength_bad_arguments(bad):
    with pytest.raises(ValueError):
        OverlapAdaptiveStrength(**bad)


def test_projection_bad_side():
    with pytest.raises(ValueError, match="side must be one of"):
        Projection(SubspaceBank(), 1.0, side="left")


def _mixed_bank_and_grads(seed=0):
    """Two shape groups, varied ranks (padding), out/in sides, tensors without bases, a 1-D one."""
    gen = torch.Generator().manual_seed(seed)
    bank, names, grads = SubspaceBank(), [], []
    for i in range(5):
        names.append(f"a{i}")
        grads.append(torch.randn(4, 24, generator=gen))
        if i != 3:  # a3 has no basis
            bank.add("d0", f"a{i}", orth(24, 2 + i, seed=10 + i), torch.rand(2 + i, generator=gen))
    for i in range(3):
        names.append(f"b{i}")
        grads.append(torch.randn(18, 4, generator=gen))
        bank.add("d0", f"b{i}", orth(18, 3, seed=20 + i), side="out")
        bank.add("d0", f"b{i}", orth(4, 1, seed=30 + i), side="in")
    bank.add("d1", "a0", orth(24, 3, seed=40))  # a second domain: merged (accumulate) basis
    names.append("bias")
    grads.append(torch.randn(24, generator=gen))
    return bank, names, grads


@pytest.mark.parametrize("side", ["in", "out", "both"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("strength", ["fixed", "global", "tensor"])
def test_batched_projection_equals_per_tensor_loop(side, weighted, strength):
    bank, names, grads = _mixed_bank_and_grads()

    def make(batched):
        st = {"fixed": FixedStrength(0.7), "global": OverlapAdaptiveStrength(0.8, beta=0.5),
              "tensor": OverlapAdaptiveStrength(0.8, beta=0.5, scope="tensor")}[strength]
        return Projection(bank, st, weighted=weighted, side=side, batched=batched)

    fast, slow = make(True), make(False)
    for step in range(3):  # several steps: the EMA, the cached plan and stacked bases are reused
        g_step = [g * (1 + step) for g in grads]
        out_f = fast(batch_of(g_step, names, step=step + 1))
        out_s = slow(batch_of(g_step, names, step=step + 1))
        for g, a, b in zip(g_step, out_f, out_s):
            assert (a is g) == (b is g)  # untouched tensors stay the same object in both paths
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert fast.metrics() == pytest.approx(slow.metrics(), rel=1e-5)
        deltas = [torch.randn_like(g) for g in grads]
        for a, b in zip(fast.project_update(names, deltas), slow.project_update(names, deltas)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out_f[3] is g_step[3] and out_f[-1] is g_step[-1]  # no basis / 1-D: pass through


def test_batched_projection_follows_bank_changes():
    bank, names, grads = _mixed_bank_and_grads()
    fast = Projection(bank, 1.0, weighted=False, batched=True)
    fast(batch_of(grads, names))
    bank.add("d2", "a3", orth(24, 4, seed=50))  # a3 gains a basis: the cached plan must notice
    out = fast(batch_of(grads, names))
    U = bank.projector("a3")[0]
    torch.testing.assert_close(out[3] @ U, torch.zeros(4, U.shape[1]), atol=1e-5, rtol=0)


def test_chunk_size_changes_no_result():
    """Every tensor its own chunk, one chunk per shape, and the device's default: the same g~."""
    bank, names, grads = _mixed_bank_and_grads()
    outs = []
    for chunk in (1, 2**40, None):
        proj = Projection(bank, OverlapAdaptiveStrength(0.8, beta=0.5), side="both", chunk_bytes=chunk)
        outs.append([proj(batch_of([g * (1 + t) for g in grads], names, step=t + 1)) for t in range(3)])
    for other in outs[1:]:
        for step_a, step_b in zip(outs[0], other, strict=True):
            for a, b in zip(step_a, step_b, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        Projection(bank, 1.0, chunk_bytes=0)


def test_an_accelerator_projects_each_shape_in_one_chunk():
    """On a CPU a shape group is cut into ~16 MiB chunks (cache-sized); elsewhere (here the meta
    device, as a GPU would) into one chunk per shape, so its ~16 ops launch once, not per chunk."""
    bank, names = SubspaceBank(), [f"layers.{i}.lora_A" for i in range(40)]
    for i, name in enumerate(names):
        bank.add("d0", name, orth(4096, 32, seed=i))
    grads = [torch.zeros(16, 4096) for _ in names]  # 1.3 MB of working set each: ~12 a CPU chunk
    assert len(Projection(bank, 1.0)._plan(names, grads)) == 4
    assert len(Projection(bank, 1.0)._plan(names, [g.to("meta") for g in grads])) == 1
    assert len(Projection(bank, 1.0, chunk_bytes=2**40)._plan(names, grads)) == 1
