"""Importance rescaling, EWC penalty, replay mixing and A-GEM."""

from __future__ import annotations

import pytest
import torch
from helpers import grad_batch

from lora_cl import AGEM, EWCPenalty, Importance, ImportanceRescale, ReplayMix, RoutedAdamW


def batch(grads, params=None, step=1, extras=None):
    return grad_batch(grads, params=params, step=step, extras=extras)


def test_importance_rescale_uses_max_normalized_fisher():
    mod = ImportanceRescale("fisher", lam=0.5)
    g1 = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    g2 = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    for step, g in enumerate([g1, g2], start=1):
        out = mod(batch([g], step=step))
        assert out[0] is g  # nothing consolidated yet: identity
    mod.on_domain_end("d0", ["t0"], [torch.zeros(1, 4)])
    fisher = (g1.square() + g2.square()) / 2  # [5, 4, 0, 8]
    omega = fisher / fisher.max()
    g = torch.ones(1, 4)
    (gt,) = mod(batch([g], step=3))
    torch.testing.assert_close(gt, (1 - 0.5 * omega).clamp(0, 1))
    assert float(gt[0, 3]) == 0.5 and float(gt[0, 2]) == 1.0


def test_importance_observe_is_idempotent_per_step():
    imp = Importance("fisher")
    g = torch.ones(2)
    imp.observe(1, ["a"], [g], [g])
    imp.observe(1, ["a"], [g], [g])
    imp.consolidate(["a"], [g])
    torch.testing.assert_close(imp.fisher("a"), torch.ones(2))


def test_si_importance_path_integral():
    imp = Importance("si", xi=0.0)
    theta = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([3.0, 0.5])]
    grads = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, 0.0])]
    for t, g in enumerate(grads):
        imp.observe(t + 1, ["a"], [theta[t]], [g])
    imp.consolidate(["a"], [theta[2]])
    # w = -g_1*(th2-th1) - g_2*(th3-th2) = [1*1 + 0.5*2, 2*0.5 + 0] = [2, 1]
    # Omega = w / (th_end - th_start)^2 = [2/9, 1/0.25]
    torch.testing.assert_close(imp.fisher("a"), torch.tensor([2 / 9, 4.0]))


def test_ewc_penalty_adds_lam_f_delta():
    mod = EWCPenalty(lam=2.0)
    g = torch.tensor([1.0, -1.0])
    mod(batch([g], step=1))
    anchor = torch.tensor([0.5, 0.5])
    mod.on_domain_end("d0", ["t0"], [anchor])
    p = torch.tensor([1.5, 0.0])
    (gt,) = mod(batch([torch.zeros(2)], params=[p], step=2))
    torch.testing.assert_close(gt, 2.0 * torch.tensor([1.0, 1.0]) * (p - anchor))


def test_replay_mix_and_passthrough():
    mod = ReplayMix(rho=0.25)
    g, r = torch.ones(3), torch.full((3,), 5.0)
    out = mod(batch([g], extras={"replay_grads": {"t0": r}}))
    torch.testing.assert_close(out[0], 0.75 * g + 0.25 * r)
    assert mod(batch([g]))[0] is g
    assert mod.metrics() == {"mixed_steps": 1.0, "unmixed_steps": 1.0}


def test_replay_grads_reach_modifier_through_optimizer_supply():
    p = torch.zeros(3, requires_grad=True)
    opt = RoutedAdamW([{"params": [p], "param_names": ["w"]}], lr=0.1, routing="shared",
                      modifiers=[ReplayMix(rho=1.0)])
    p.grad = torch.ones(3)
    opt.supply(replay_grads={"w": -torch.ones(3)})
    opt.step()
    assert (p > 0).all()  # moved along -g_r, i.e. the replay gradient won
    p.grad = torch.ones(3)
    opt.step()  # supply is per step: now the raw gradient is used
    assert opt.modifiers[0].unmixed_steps == 1


def test_agem_removes_conflicting_component_only():
    mod = AGEM()
    g, r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    (gt,) = mod(batch([g], extras={"replay_grads": {"t0": r}}))
    assert float(gt @ r) == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(gt, torch.tensor([0.5, 0.5]))
    g2 = torch.tensor([0.0, 1.0])  # agrees with r: untouched
    (gt2,) = mod(batch([g2], extras={"replay_grads": {"t0": r}}))
    torch.testing.assert_close(gt2, g2)
    assert mod.metrics()["projected_fraction"] == 0.5


@pytest.mark.parametrize("factory", [lambda: ReplayMix(rho=2), lambda: ImportanceRescale(lam=-1),
                                     lambda: Importance("l2"), lambda: EWCPenalty(lam=-1)])
def test_bad_arguments(factory):
    with pytest.raises(ValueError):
        factory()
