"""torch.optim's own contract for RoutedAdamW: what an AdamW user relies on keeps working.

Each check runs RoutedAdamW (no modifier, every routing) beside torch.optim.AdamW on the same
parameters and gradients and asks for bitwise equal weights.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from lora_cl import FixedStrength, Projection, RoutedAdamW, SubspaceBank

ROUTINGS = ["vanilla", "shared", "decoupled", "v_only"]
IMPLS = [("reference", {}), ("fused", {"fused": True})]


def params(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 16), (16, 8), (12,), (3, 5, 2)][:n]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def grads_for(ps: list[torch.Tensor], t: int, skip: set[int] = frozenset()) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for i, p in enumerate(ps):
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if i in skip else g


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_params_without_grad_are_left_alone_as_in_adamw(routing, impl, kw):
    ours, ref = params(), params()
    opt = RoutedAdamW(ours, lr=1e-2, weight_decay=0.1, routing=routing, impl=impl)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, **kw)
    frozen = ours[1].detach().clone()
    for t in range(6):
        skip = {1} if t < 3 else {2}  # tensor 1 gets its first grad late, tensor 2 loses its grad
        grads_for(ours, t, skip), grads_for(ref, t, skip)
        opt.step(), ref_opt.step()
        if t < 3:
            assert torch.equal(ours[1], frozen) and ours[1] not in opt.state  # no state, no decay
    same(ours, ref)
    assert opt.state[ours[1]]["step"] == ref_opt.state[ref[1]]["step"] == 3


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_groups_with_their_own_lr_betas_and_decay(routing, impl, kw):
    def groups(ps):
        return [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.2},
                {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.95), "eps": 1e-6}]

    ours, ref = params(), params()
    opt = RoutedAdamW(groups(ours), routing=routing, impl=impl)
    ref_opt = torch.optim.AdamW(groups(ref), **kw)
    for t in range(8):
        grads_for(ours, t), grads_for(ref, t)
        opt.step(), ref_opt.step()
    same(ours, ref)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_add_param_group_mid_run(routing, impl, kw):
    ours, ref = params(), params()
    opt = RoutedAdamW(ours[:2], lr=1e-2, weight_decay=0.05, routing=routing, impl=impl)
    ref_opt = torch.optim.AdamW(ref[:2], lr=1e-2, weight_decay=0.05, **kw)
    for t in range(10):
        if t == 4:
            opt.add_param_group({"params": ours[2:], "lr": 5e-3})
            ref_opt.add_param_group({"params": ref[2:], "lr": 5e-3})
            assert opt.param_groups[1]["routing"] == routing  # the new group takes the default
        grads_for(ours, t), grads_for(ref, t)
        opt.step(), ref_opt.step()
    same(ours, ref)
    assert opt.state[ours[3]]["step"] == 6
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [ours[0]]})


def _projected(ps):
    bank = SubspaceBank()
    bank.add("old", "t0", torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(3)))[0])
    return RoutedAdamW([{"params": ps, "param_names": ["t0", "t1", "t2", "t3"]}], lr=1e-2,
                       modifiers=[Projection(bank, strength=FixedStrength(0.5))])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_the_same_trajectory(how):
    ps = params()
    opt = _projected(ps)
    for t in range(3):
        grads_for(ps, t)
        opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        pickle.dump(opt, buf)
        twin = pickle.loads(buf.getvalue())
    twin_ps = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(ps, twin_ps))
    same(ps, [p.detach() for p in twin_ps])
    assert twin.modifiers[0].bank is not opt.modifiers[0].bank  # its own bank, not a shared one
    for t in range(3, 6):
        grads_for(ps, t), grads_for(twin_ps, t)
        opt.step(), twin.step()
    same(ps, twin_ps)
    assert twin.metrics()["projection/projected_tensors"] == 1.0


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("impl,kw", IMPLS)
def test_tensor_lr_is_read_as_its_value(routing, impl, kw):
    """A tensor lr (what a scheduler may fill in place) is read as a Python float each step: the
    same trajectory as AdamW with that float, bitwise. torch's own tensor-lr path computes
    1 - lr*wd and lr/bias_correction in fp32 tensors, which differs from that by rounding."""
    lr = torch.tensor(1e-2)
    ours, ref, ref_t = params(), params(), params()
    opt = RoutedAdamW(ours, lr=lr, weight_decay=0.1, routing=routing, impl=impl)
    ref_opt = torch.optim.AdamW(ref, lr=lr.item(), weight_decay=0.1, **kw)
    ref_t_opt = torch.optim.AdamW(ref_t, lr=lr.clone(), weight_decay=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref_opt, ref_t_opt)]
    for t in range(6):
        for ps, o in ((ours, opt), (ref, ref_opt), (ref_t, ref_t_opt)):
            grads_for(ps, t)
            o.step()
        for s in scheds:
            s.step()
    same(ours, ref)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # kept as the user gave it
    assert float(opt.param_groups[0]["lr"]) == ref_opt.param_groups[0]["lr"]
    for a, b in zip(ours, ref_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero_grad_set_to_none_and_state_dict_round_trip_as_in_adamw():
    ours = params()
    opt = RoutedAdamW(ours, lr=1e-2)
    grads_for(ours, 0)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in ours)
    sd = opt.state_dict()
    assert set(sd) >= {"state", "param_groups"} and sorted(sd["state"]) == [0, 1, 2, 3]
    assert set(sd["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}
