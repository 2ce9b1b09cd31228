"""The default step decides skip-or-step on the device: no host sync per ``step()``.

A host sync is any op that copies a device value to Python (``.item()``, ``bool()``, ``float()``,
``.tolist()``): all of them dispatch to ``aten._local_scalar_dense``, which the mode below counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_cl import FixedStrength, Projection, RoutedAdamW, SubspaceBank

ROUTINGS = ["vanilla", "shared", "decoupled", "v_only"]


class CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in [(8, 64), (64, 8), (16,)]]


def set_grads(ps: list[torch.Tensor], t: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        ps[1].grad[3, 2] = float("nan")


def syncs_per_step(opt: RoutedAdamW, ps: list[torch.Tensor], steps: int = 3) -> int:
    set_grads(ps, 0)
    opt.step()  # the first step creates the states
    mode = CountSyncs()
    with mode:
        for t in range(1, steps + 1):
            set_grads(ps, t)
            opt.step()
    return mode.syncs


@pytest.mark.parametrize("routing", ROUTINGS)
def test_default_step_has_no_host_sync(routing):
    ps = params()
    assert syncs_per_step(RoutedAdamW(ps, lr=1e-2, weight_decay=0.1, routing=routing), ps) == 0


def test_host_path_is_where_the_decision_needs_the_host():
    """With a projection (and with nonfinite='raise') the guard still reads its flag: one sync a
    step, the cost the device path removes from the default."""
    ps = params()
    bank = SubspaceBank()
    bank.add("old", "t0", torch.linalg.qr(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)))[0])
    opt = RoutedAdamW([{"params": ps, "param_names": ["t0", "t1", "t2"]}], lr=1e-2,
                      modifiers=[Projection(bank, strength=FixedStrength(0.5))])
    assert syncs_per_step(opt, ps) >= 3
    ps = params()
    assert syncs_per_step(RoutedAdamW(ps, lr=1e-2, nonfinite="raise"), ps) == 3


@pytest.mark.parametrize("routing", ROUTINGS)
def test_device_guard_skips_a_nonfinite_step_with_states_untouched(routing):
    ps, ref = params(), params()
    opt = RoutedAdamW(ps, lr=1e-2, weight_decay=0.1, routing=routing)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    for t in range(3):
        set_grads(ps, t), set_grads(ref, t)
        opt.step(), ref_opt.step()
    before = ([p.detach().clone() for p in ps],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in ps])
    set_grads(ps, 3, nan=True)
    mode = CountSyncs()
    with mode:
        opt.step()  # decided on the device: no sync, no warning yet
    assert mode.syncs == 0
    for p, b in zip(ps, before[0], strict=True):
        assert torch.equal(p, b)
    for p, st in zip(ps, before[1], strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())  # m, v and step
    with pytest.warns(RuntimeWarning, match=r"skipped 1 step\(s\) with non-finite gradients"):
        assert opt.skipped_steps == 1  # read lazily
    assert opt.global_step == 3
    for t in range(4, 7):  # and the run goes on exactly as AdamW without the bad step
        set_grads(ps, t), set_grads(ref, t)
        opt.step(), ref_opt.step()
    for a, b in zip(ps, ref, strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.global_step == 6 and opt.skipped_steps == 1
    assert opt.state_dict()["lora_cl"]["global_step"] == 6
