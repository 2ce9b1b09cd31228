"""RoutedAdamW never silently does the wrong thing: coverage errors, the guard over g~, the
decoupled step bound with additive modifiers, and routing checked on resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lora_cl import (
    AGEM,
    EWCPenalty,
    OverlapAdaptiveStrength,
    Projection,
    ReplayMix,
    RoutedAdamW,
    SubspaceBank,
)
from lora_cl.modifiers import GradientModifier
from lora_cl.optim.routed_adamw import NonFiniteGradientError
from lora_cl.subspace import GradientRowBuffer


def _bank(name: str = "a", dim: int = 32, k: int = 4, seed: int = 0) -> SubspaceBank:
    gen = torch.Generator().manual_seed(seed)
    bank = SubspaceBank()
    bank.add("old", name, torch.linalg.qr(torch.randn(dim, k, generator=gen))[0])
    return bank


def _param(shape=(4, 32), seed: int = 0) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)


# -- 1. a projection that projects nothing is loud ---------------------------------------------
def test_projection_refuses_unnamed_routed_tensors():
    with pytest.raises(ValueError, match="Projection key.*no 'param_names'.*lora_cl.param_groups"):
        RoutedAdamW([_param()], modifiers=[Projection(_bank())])


def test_unknown_group_key_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="unknown param-group key 'names'; did you mean 'param_names'"):
        RoutedAdamW([{"params": [_param()], "names": ["a"]}])
    with pytest.raises(ValueError, match="unknown param-group key 'amsgrad'"):
        RoutedAdamW([{"params": [_param()], "amsgrad": True}])
    opt = RoutedAdamW([{"params": [_param()], "param_names": ["a"]}])
    with pytest.raises(ValueError, match="'modifiers'"):
        opt.add_param_group({"params": [_param(seed=1)], "modifiers": []})


def test_bank_matching_no_routed_tensor_is_an_error_and_a_partial_match_warns():
    p = _param()
    p.grad = torch.randn_like(p)
    opt = RoutedAdamW([{"params": [p], "param_names": ["b"]}], modifiers=[Projection(_bank("a"))])
    with pytest.raises(ValueError, match="none of the 1 routed tensors.*'param_names'"):
        opt.step()
    assert not opt.state[p] or float(opt.state[p]["step"]) == 0  # nothing stepped

    bank = _bank("a")
    bank.add("old", "stray", torch.linalg.qr(torch.randn(32, 2))[0])
    opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], modifiers=[Projection(bank)])
    with pytest.warns(RuntimeWarning, match="1 of the bank's 2 tensor names match no routed tensor.*stray"):
        opt.step()
    with warnings.catch_warnings():  # once per bank version, not every step
        warnings.simplefilter("error")
        opt.step()


def test_metrics_report_what_was_projected():
    a, b = _param(seed=0), _param(seed=1)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt = RoutedAdamW([{"params": [a, b], "param_names": ["a", "b"]}],
                      modifiers=[Projection(_bank("a"), 0.5)])
    opt.step()
    m = opt.metrics()
    assert m["projection/projected_tensors"] == 1.0
    assert m["projection/projected_elements"] == float(a.numel())


def test_replay_grads_for_no_routed_tensor_are_an_error():
    p = _param()
    p.grad = torch.randn_like(p)
    opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], modifiers=[ReplayMix(0.5)])
    opt.supply(replay_grads={"model.a": torch.ones_like(p)})
    with pytest.raises(ValueError, match="ReplayMix: replay_grads.*none is a routed tensor"):
        opt.step()


# -- 2. the guard covers what the modifier chain produces ---------------------------------------
def _snapshot(opt: RoutedAdamW, params):
    return (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params])


def _assert_untouched(opt, params, snap):
    state, values = snap
    for p, v in zip(params, values, strict=True):
        assert torch.equal(p.detach(), v)
    now = opt.state_dict()
    assert now["lora_cl"]["global_step"] == state["lora_cl"]["global_step"]
    torch.testing.assert_close(now["state"], state["state"], rtol=0, atol=0)
    assert repr(now["lora_cl"]["modifiers"]) == repr(state["lora_cl"]["modifiers"])


@pytest.mark.parametrize("routing", ["shared", "decoupled"])
def test_nan_replay_gradient_skips_the_step_and_leaves_every_state(routing):
    p = _param()
    bank = _bank("a")
    opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing=routing, lr=1e-2,
                      modifiers=[GradientRowBuffer("in", rank=2), Projection(bank, OverlapAdaptiveStrength()),
                                 ReplayMix(0.5)])
    for _ in range(3):  # warm every state: moments, EMA, buffered rows, mix counters
        p.grad = torch.randn_like(p)
        opt.supply(replay_grads={"a": torch.randn_like(p)})
        opt.step()
    snap = _snapshot(opt, [p])
    p.grad = torch.randn_like(p)
    bad = torch.randn_like(p)
    bad[0, 0] = float("nan")
    opt.supply(replay_grads={"a": bad})
    with pytest.warns(RuntimeWarning, match=r"skipped step.*a \(modified gradient\).*modifier chain"):
        opt.step()
    _assert_untouched(opt, [p], snap)
    assert opt.skipped_steps == 1
    raising = RoutedAdamW([{"params": [p], "param_names": ["a"]}], modifiers=[ReplayMix(0.5)],
                          nonfinite="raise")
    raising.supply(replay_grads={"a": bad})
    with pytest.raises(NonFiniteGradientError, match=r"a \(modified gradient\)"):
        raising.step()


def test_nan_in_the_ewc_penalty_skips_the_step():
    p = _param()
    ewc = EWCPenalty(lam=1.0)
    opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], modifiers=[ewc], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.end_domain("d0")
    ewc.importance.total["a"][0, 0] = float("inf")  # an overflowed Fisher
    p.data.add_(0.01)
    snap = _snapshot(opt, [p])
    p.grad = torch.randn_like(p)
    with pytest.warns(RuntimeWarning, match="skipped step"):
        opt.step()
    _assert_untouched(opt, [p], snap)


# -- 3. decoupled steps stay within Adam's bound with additive modifiers ------------------------
@pytest.mark.parametrize("modifier", ["mix", "ewc", "agem"])
def test_decoupled_step_is_bounded_with_additive_modifiers(modifier):
    """g = 1e-6 and a replay/penalty term of order 1: v on g alone moved a weight to -495 in 10 steps
    (lr 1e-4); with v covering g~ every coordinate moves at most ~lr per step, as in Adam."""
    lr, steps = 1e-4, 10
    moved = {}
    for routing in ("shared", "decoupled"):
        p = torch.nn.Parameter(torch.zeros(4, 8))
        if modifier == "mix":
            mods = [ReplayMix(0.5)]
        elif modifier == "agem":
            mods = [AGEM()]
        else:
            mods = [EWCPenalty(lam=1.0)]
        opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing=routing, lr=lr,
                          modifiers=mods)
        if modifier == "ewc":
            ewc = mods[0]
            ewc.importance.total["a"] = torch.ones(4, 8)
            ewc.importance.anchors["a"] = torch.full((4, 8), 1.0)  # penalty gradient ~ -1
        for _ in range(steps):
            p.grad = torch.full_like(p, 1e-6)
            if modifier != "ewc":
                opt.supply(replay_grads={"a": torch.full_like(p, -1.0)})
            opt.step()
        moved[routing] = float(p.detach().abs().max())
    assert moved["decoupled"] <= steps * lr * 1.01, moved
    assert moved["shared"] <= steps * lr * 1.01, moved


def test_decoupled_projection_still_keeps_v_on_the_raw_gradient():
    """Attenuating modifiers keep the paper's rule: with a projection that zeroes g, m stays 0
    and v grows from the raw g."""
    p = _param()
    bank = SubspaceBank()
    bank.add("old", "a", torch.eye(32))  # the whole space: alpha = 1 removes everything
    opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing="decoupled",
                      modifiers=[Projection(bank, 1.0, weighted=False)])
    g = torch.randn_like(p)
    p.grad = g
    opt.step()
    m, v = opt.moments(p)
    assert m.abs().max() < 1e-6
    torch.testing.assert_close(v, 0.001 * g.square())


# -- 4. resume checks the routing; torch.optim.AdamW checkpoints load ---------------------------
def test_resume_refuses_another_routing():
    p = _param()
    p.grad = torch.randn_like(p)
    saved = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing="decoupled")
    saved.step()
    fresh = RoutedAdamW([{"params": [p], "param_names": ["a"]}], routing="shared")
    with pytest.raises(ValueError, match="routed 'decoupled' but this optimizer's is 'shared'"):
        fresh.load_state_dict(saved.state_dict())
    assert fresh.param_groups[0]["routing"] == "shared" and not fresh.state


def test_loads_a_torch_adamw_checkpoint_and_continues_exactly():
    torch.manual_seed(0)
    ref = _param()
    mine = torch.nn.Parameter(ref.detach().clone())
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    grads = [torch.randn_like(ref) for _ in range(6)]
    for g in grads[:3]:
        ref.grad = g
        adamw.step()
    mine.data.copy_(ref.detach())
    opt = RoutedAdamW([{"params": [mine], "param_names": ["a"]}], lr=1e-2, weight_decay=0.1,
                      impl="reference")
    opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[0]["routing"] == "decoupled"
    for g in grads[3:]:
        ref.grad, mine.grad = g, g.clone()
        adamw.step()
        opt.step()
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=0, atol=0)
    amsgrad = torch.optim.AdamW([_param()], amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True, which RoutedAdamW does not implement"):
        RoutedAdamW([_param()]).load_state_dict(amsgrad)


# -- 9. the fused path: accuracy for small beta1, nothing written before the kernel can fail ----
@pytest.mark.parametrize("beta1", [1e-4, 1e-6])
def test_fused_path_equals_reference_for_small_beta1(beta1):
    """The pre-correction scales by (1-b1)/b1; below FUSED_MIN_BETA1 it lost ~1e-4 (relative, in
    m at beta1 = 1e-6), so those steps run the reference path: equal bit for bit."""
    runs = {}
    for impl in ("fused", "reference"):
        p = _param()
        opt = RoutedAdamW([{"params": [p], "param_names": ["a"]}], betas=(beta1, 0.999), impl=impl,
                          modifiers=[Projection(_bank("a"), 0.5)], lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        runs[impl] = (p.detach().clone(), opt.moments(p)[0].clone())
    assert torch.equal(runs["fused"][0], runs["reference"][0])
    assert torch.equal(runs["fused"][1], runs["reference"][1])


def test_fused_kernel_error_leaves_the_first_moment_as_it_was(monkeypatch):
    from lora_cl.optim.functional import routed_adamw_fused

    p, m, v = torch.randn(4, 8), torch.randn(4, 8), torch.rand(4, 8)
    step = torch.tensor(3.0)
    m0 = m.clone()

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(torch, "_fused_adamw_", broken_kernel)
    with pytest.raises(RuntimeError, match="kernel failed"):
        routed_adamw_fused([p], [torch.randn(4, 8)], [torch.randn(4, 8)], [m], [v], [step], lr=1e-3,
                           beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(m, m0, rtol=1e-6, atol=1e-6)


def test_modifier_output_of_another_dtype_or_shape():
    class Halve(GradientModifier):
        def apply(self, batch):
            return [g.double() * 0.5 for g in batch.grads]

    class Wrong(GradientModifier):
        def apply(self, batch):
            return [g.reshape(-1) for g in batch.grads]

    p = _param()
    p.grad = torch.ones_like(p)
    opt = RoutedAdamW([p], routing="shared", modifiers=[Halve()], impl="fused")
    opt.step()  # fp64 g~ is cast to the fp32 states, not refused by the kernel half-way
    torch.testing.assert_close(opt.moments(p)[0], torch.full_like(p, 0.05))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"returned shape \(128,\) for 'group0.param0'"):
        RoutedAdamW([p], modifiers=[Wrong()]).step()
