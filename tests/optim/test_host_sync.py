"""The default step decides skip-or-step on the device: no host sync per ``step()``.

A host sync is any op that copies a device value to Python (``.item()``, ``bool()``, ``float()``,
``.tolist()``): all of them dispatch to ``aten._local_scalar_dense``, which lora_cl.diagnostics.CountSyncs
counts. The function mode beside it names the Python-level calls that would sync on a GPU
(``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``, ``numpy``), which on
this CPU cost nothing and so would pass unseen by the dispatch count alone.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lora_cl import (
    FixedStrength,
    GradientRowBuffer,
    NonFiniteGradientError,
    OverlapAdaptiveStrength,
    Projection,
    RoutedAdamW,
    SubspaceBank,
)
from lora_cl.diagnostics import CountSyncs
from lora_cl.subspace import basis_from_rows

ROUTINGS = ["vanilla", "shared", "decoupled", "v_only"]


SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
           torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


class NameSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in SYNCING:
            self.calls.append(func.__name__)
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
    """Host syncs over ``steps`` steps after the first: the dispatch count, asserted equal to the
    Python-level calls the function mode saw (so neither can miss what the other sees)."""
    set_grads(ps, 0)
    opt.step()  # the first step creates the states
    syncs, named = CountSyncs(), NameSyncs()
    with syncs, named:
        for t in range(1, steps + 1):
            set_grads(ps, t)
            opt.step()
    assert (syncs.syncs == 0) == (not named.calls), (syncs.syncs, named.calls)
    return syncs.syncs + len([c for c in named.calls if c in ("cpu", "numpy")])


def bank(sides: tuple[str, ...] = ("in",)) -> SubspaceBank:
    """Bases of rank 4 for t0 (8 x 64) and t1 (64 x 8) on the given sides."""
    gen = torch.Generator().manual_seed(1)
    out = SubspaceBank()
    for name, shape in (("t0", (8, 64)), ("t1", (64, 8))):
        for side in sides:
            dim = shape[1] if side == "in" else shape[0]
            k = min(4, dim)
            out.add("old", name, torch.linalg.qr(torch.randn(dim, k, generator=gen))[0], side=side)
    return out


def projected(ps: list[torch.Tensor], routing: str, strength, side: str = "in",  # noqa: ANN001
              **kw) -> RoutedAdamW:
    sides = ("in", "out") if side == "both" else (side,)
    return RoutedAdamW([{"params": ps, "param_names": ["t0", "t1", "t2"]}], lr=1e-2, weight_decay=0.1,
                       routing=routing, modifiers=[Projection(bank(sides), strength=strength, side=side)],
                       **kw)


STRENGTHS = {
    "fixed": lambda: FixedStrength(0.5),
    "hard": lambda: FixedStrength(1.0),
    "overlap": lambda: OverlapAdaptiveStrength(0.5, beta=0.9),
    "overlap-tensor": lambda: OverlapAdaptiveStrength(0.5, beta=0.9, scope="tensor"),
    "overlap-debiased": lambda: OverlapAdaptiveStrength(0.5, beta=0.9, bias_correction=True),
}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_default_step_has_no_host_sync(routing):
    ps = params()
    assert syncs_per_step(RoutedAdamW(ps, lr=1e-2, weight_decay=0.1, routing=routing), ps) == 0


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("strength", sorted(STRENGTHS))
@pytest.mark.parametrize("side", ["in", "out", "both"])
def test_projection_step_has_no_host_sync(routing, strength, side):
    ps = params()
    assert syncs_per_step(projected(ps, routing, STRENGTHS[strength](), side), ps) == 0


def test_host_path_is_where_the_decision_needs_the_host():
    """With nonfinite='raise', a strength with warmup or a modifier without a device commit the
    guard still reads its flag: one sync a step, the cost the device path removes."""
    ps = params()
    assert syncs_per_step(RoutedAdamW(ps, lr=1e-2, nonfinite="raise"), ps) == 3
    ps = params()
    assert syncs_per_step(projected(ps, "decoupled", FixedStrength(0.5), nonfinite="raise"), ps) >= 3
    ps = params()
    assert syncs_per_step(projected(ps, "decoupled", OverlapAdaptiveStrength(0.5, warmup=2)), ps) >= 3


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


def test_device_guard_names_the_nonfinite_tensors_of_the_latest_skipped_step():
    """The skip is decided on the device and read lazily; the warning then names the tensors that
    were non-finite in the latest skipped step, not those of a later finite one."""
    ps = params()
    opt = RoutedAdamW(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.step()
    set_grads(ps, 1, nan=True)  # NaN in param 1
    opt.step()
    set_grads(ps, 2)
    ps[0].grad[0, 0] = float("inf")  # inf in param 0 only
    opt.step()
    set_grads(ps, 3)  # a finite step last
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"skipped 2 step\(s\) .* the last one in 1 tensor\(s\): "
                      r"group0\.param0\. Check"):
        assert opt.skipped_steps == 2 and opt.global_step == 2


def _run(opt: RoutedAdamW, ps: list[torch.Tensor], ts: list[int], nan_at: int | None = None) -> None:
    for t in ts:
        set_grads(ps, t, nan=t == nan_at)
        opt.step()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("strength", sorted(STRENGTHS))
@pytest.mark.parametrize("side", ["in", "out", "both"])  # one side: decoupled hands m its delta
def test_projection_device_path_equals_the_host_path(routing, strength, side):
    """The same steps decided on the device and on the host (nonfinite='raise' keeps it there)."""
    dev_ps, host_ps = params(), params()
    dev = projected(dev_ps, routing, STRENGTHS[strength](), side)
    host = projected(host_ps, routing, STRENGTHS[strength](), side, nonfinite="raise")
    _run(dev, dev_ps, list(range(6))), _run(host, host_ps, list(range(6)))
    for a, b in zip(dev_ps, host_ps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for x, y in zip(dev.moments(a), host.moments(b), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)  # (the pre-correction rounds)
    assert dev.metrics() == pytest.approx(host.metrics(), rel=1e-6)
    saved, want = dev.state_dict()["lora_cl"], host.state_dict()["lora_cl"]
    assert (saved["global_step"], saved["skipped_steps"]) == (want["global_step"], want["skipped_steps"])
    got_s, want_s = (st["modifiers"][0]["state"]["strength"] for st in (saved, want))
    assert got_s.get("steps") == want_s.get("steps")
    assert got_s.get("sbar", {}).keys() == want_s.get("sbar", {}).keys()
    for key, value in want_s.get("sbar", {}).items():
        torch.testing.assert_close(got_s["sbar"][key], value, rtol=1e-6, atol=0)


@pytest.mark.parametrize("routing", ["shared", "decoupled", "v_only"])
@pytest.mark.parametrize("strength", sorted(STRENGTHS))
@pytest.mark.parametrize("side", ["in", "both"])
def test_projection_device_guard_skips_with_every_state_untouched(routing, strength, side):
    """A NaN step decided on the device leaves p, m, v, the step counts and the strength's EMAs
    and step count as they were: the run equals one that never saw the bad step."""
    ps, ref = params(), params()
    opt = projected(ps, routing, STRENGTHS[strength](), side)
    ref_opt = projected(ref, routing, STRENGTHS[strength](), side)
    _run(opt, ps, [0, 1, 2]), _run(ref_opt, ref, [0, 1, 2])
    strength_before = opt.modifiers[0].strength.state_dict()
    mode = CountSyncs()
    with mode:
        _run(opt, ps, [3], nan_at=3)
    assert mode.syncs == 0
    after = opt.modifiers[0].strength.state_dict()
    assert after.get("steps") == strength_before.get("steps")
    for key, value in strength_before.get("sbar", {}).items():
        assert torch.equal(after["sbar"][key], value)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 step\(s\).*t1"):
        assert opt.skipped_steps == 1
    _run(opt, ps, [4, 5]), _run(ref_opt, ref, [4, 5])
    for a, b in zip(ps, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.metrics() == ref_opt.metrics() | {"optim/skipped_steps": 1.0}


# -- the guard fed the norm gradient clipping computed (supply_grad_norm) -----------------------
class CountNorms(TorchDispatchMode):
    """Counts the ops a guard reads gradients with (a norm of any kind)."""

    NORMS = {torch.ops.aten._foreach_norm.Scalar, torch.ops.aten.linalg_vector_norm.default}

    def __init__(self) -> None:
        super().__init__()
        self.norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self.NORMS:
            self.norms += 1
        return func(*args, **(kwargs or {}))


def _clipped_step(opt: RoutedAdamW, ps: list[torch.Tensor], supply: bool) -> CountNorms:
    norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    if supply:
        opt.supply_grad_norm(norm, ps)
    mode = CountNorms()
    with mode:
        opt.step()
    return mode


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])  # the device and the host path
def test_supplied_norm_spares_the_guard_its_read(nonfinite):
    ps, ref = params(), params()
    opt, ref_opt = (RoutedAdamW(x, lr=1e-2, weight_decay=0.1, nonfinite=nonfinite) for x in (ps, ref))
    for t in range(3):
        set_grads(ps, t), set_grads(ref, t)
        fed, read = _clipped_step(opt, ps, supply=True), _clipped_step(ref_opt, ref, supply=False)
        assert fed.norms == 0 and read.norms > 0, (fed.norms, read.norms)
    for a, b in zip(ps, ref, strict=True):
        assert torch.equal(a, b)


def _nan_after_supply(ps: list[torch.Tensor], how: str) -> None:
    if how == "in place":
        ps[1].grad[0, 0] = float("nan")  # bumps the gradient's _version
    elif how == "replaced":
        ps[1].grad = torch.full_like(ps[1], float("nan"))
    else:  # "not covered": ps[2] had no gradient when the norm was taken
        ps[2].grad = torch.full_like(ps[2], float("nan"))


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("how", ["in place", "replaced", "not covered"])
def test_supplied_norm_covers_only_the_gradients_it_was_taken_over(nonfinite, how):
    """A finite norm, then a NaN the norm never saw: the guard still catches it."""
    ps, opt, before = _one_step_then_grads(nonfinite)
    if how == "not covered":
        ps[2].grad = None
    opt.supply_grad_norm(torch.nn.utils.clip_grad_norm_([p for p in ps if p.grad is not None], 1.0), ps)
    _nan_after_supply(ps, how)
    _step_is_skipped(opt, ps, before, nonfinite, "skipped 1 step")


def _one_step_then_grads(nonfinite: str) -> tuple[list[torch.Tensor], RoutedAdamW, list[torch.Tensor]]:
    """An optimizer one step in, the weights after it, and the next step's gradients set."""
    ps = params()
    opt = RoutedAdamW(ps, lr=1e-2, nonfinite=nonfinite)
    set_grads(ps, 0)
    opt.step()
    before = [p.detach().clone() for p in ps]
    set_grads(ps, 1)
    return ps, opt, before


def _step_is_skipped(opt: RoutedAdamW, ps: list[torch.Tensor], before: list[torch.Tensor],
                     nonfinite: str, match: str) -> None:
    """The next step raises ("raise") or is skipped with a warning matching ``match``; either
    way every parameter stays as ``before``."""
    if nonfinite == "raise":
        with pytest.raises(NonFiniteGradientError):
            opt.step()
    else:
        opt.step()
        with pytest.warns(RuntimeWarning, match=match):
            assert opt.skipped_steps == 1
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_supplied_norm_skips_the_step(nonfinite):
    ps, opt, before = _one_step_then_grads(nonfinite)
    opt.supply_grad_norm(torch.tensor(float("inf")), ps)
    _step_is_skipped(opt, ps, before, nonfinite, "3 gradient\\(s\\) under the supplied norm")


@pytest.mark.parametrize("norm", [torch.tensor(1.0, dtype=torch.float16), torch.tensor([1.0, 2.0])])
def test_a_norm_the_guard_cannot_trust_is_not_used(norm):
    """float16 (its range reads a large finite sum of squares as inf) or not one scalar: read."""
    ps = params()
    opt = RoutedAdamW(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.supply_grad_norm(norm, ps)
    mode = CountNorms()
    with mode:
        opt.step()
    assert mode.norms > 0


def test_a_supplied_norm_lasts_one_step():
    ps = params()
    opt = RoutedAdamW(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.supply_grad_norm(torch.tensor(1.0), ps)
    opt.step()
    mode = CountNorms()
    with mode:
        opt.step()  # the same gradient objects, unchanged: but the hint was for one step
    assert mode.norms > 0


@pytest.mark.parametrize("routing", ["shared", "decoupled", "v_only"])
def test_decoupled_projection_hands_m_its_delta_not_g_tilde(routing):
    """Decoupled on the device path: g~ feeds only m, so the projection hands over g~ - g
    (GradBatch.m_deltas) and leaves g as it is; the step equals the host path's (parity test
    above). Shared and v_only need g~ itself for v."""
    ps = params()
    opt = projected(ps, routing, FixedStrength(0.5), "in")
    proj = opt.modifiers[0]
    seen = []
    apply = proj.apply

    def spy(batch):  # noqa: ANN001, ANN202
        out = apply(batch)
        seen.append((batch.m_only, len(batch.m_delta_fns), [o is r for o, r in zip(out, batch.raw)]))
        return out

    proj.apply = spy
    _run(opt, ps, [0, 1])
    m_only, handed, unchanged = seen[-1]
    if routing == "decoupled":
        assert m_only and handed == 2 and unchanged == [True, True, True]  # t0, t1: 2 shapes
    else:
        assert not m_only and handed == 0 and unchanged == [False, False, True]


def ogp_chain(ps: list[torch.Tensor], **kw) -> tuple[RoutedAdamW, GradientRowBuffer]:
    """The ogp preset's chain: gradient-row buffers (to build the next bases) + an overlap projection."""
    rows = GradientRowBuffer("in", rank=4, max_rows=1024)
    opt = RoutedAdamW([{"params": ps, "param_names": ["t0", "t1", "t2"]}], lr=1e-2, routing="decoupled",
                      modifiers=[rows, Projection(bank(), strength=OverlapAdaptiveStrength(0.5, beta=0.9))],
                      **kw)
    return opt, rows


def test_ogp_chain_has_no_host_sync():
    """The gradient-row buffer commits on the device (a skipped step pushes zero rows), so the
    ogp chain's guard reads nothing back either (it was one sync a step)."""
    ps = params()
    assert syncs_per_step(ogp_chain(ps)[0], ps) == 0


def test_row_buffer_device_commit_equals_the_host_path_and_a_skip_adds_only_zeros():
    """Without a skip the device path buffers the host path's rows bit for bit; a NaN step skipped
    on the device pushes zero rows, which leave the basis built from the buffer as it was."""
    buffers = {}
    for impl, nonfinite in (("fused", "skip"), ("reference", "skip")):  # device path; host path
        ps = params()
        opt, rows = ogp_chain(ps, impl=impl, nonfinite=nonfinite)
        for t in range(4):
            set_grads(ps, t)
            opt.step()
        buffers[impl] = (ps, opt, rows)
    for name in ("t0", "t1"):
        assert torch.equal(buffers["fused"][2].rows(name), buffers["reference"][2].rows(name))
    ps, opt, rows = buffers["fused"]
    before = {n: rows.rows(n).clone() for n in rows.names()}
    set_grads(ps, 9, nan=True)
    opt.step()
    assert opt.skipped_steps == 1
    for name, old in before.items():
        new = rows.rows(name)
        assert torch.equal(new[: old.shape[0]], old) and not new[old.shape[0]:].any()  # zeros, no NaN
        u_old = basis_from_rows(old, rank=4)[0]
        u_new = basis_from_rows(new, rank=4)[0]
        torch.testing.assert_close(u_new @ u_new.T, u_old @ u_old.T, rtol=1e-4, atol=1e-5)


def _group_of_four(seed: int = 0) -> tuple[list[torch.Tensor], list[str], SubspaceBank]:
    """Four same-shaped tensors with fan-in bases (one batched group) and one without."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(8, 64, generator=gen).requires_grad_() for _ in range(4)]
    ps.append(torch.randn(64, 8, generator=gen).requires_grad_())
    names = [f"a{i}" for i in range(4)] + ["b"]
    gen = torch.Generator().manual_seed(1)
    out = SubspaceBank()
    for name in names[:4]:
        out.add("old", name, torch.linalg.qr(torch.randn(64, 4, generator=gen))[0])
    return ps, names, out


def _four(ps: list[torch.Tensor], names: list[str], bank_: SubspaceBank, **kw) -> RoutedAdamW:  # noqa: ANN003
    return RoutedAdamW([{"params": ps, "param_names": names}], lr=1e-2, weight_decay=0.1,
                       betas=(0.8, 0.99), routing="decoupled",
                       modifiers=[Projection(bank_, OverlapAdaptiveStrength(0.5, beta=0.9))], **kw)


def test_decoupled_projection_adds_its_delta_into_the_stacked_first_moments():
    """Decoupled on the device path: the projection's product adds (1-b1)/b1 (g~ - g) straight
    into the group's first moments, kept as rows of one tensor (one pass over m, no g~ - g
    formed). The run equals the host path's; a NaN step leaves every moment as it was; a
    state_dict saved with torch.save and loaded into a fresh optimizer resumes exactly."""
    from lora_cl.optim.routed_adamw import _stacked_rows

    (dev_ps, names, bank_), (host_ps, _, host_bank) = _group_of_four(), _group_of_four()
    dev, host = _four(dev_ps, names, bank_), _four(host_ps, names, host_bank, nonfinite="raise")
    _run(dev, dev_ps, [0, 1, 2]), _run(host, host_ps, [0, 1, 2])
    rows = [dev.state[p]["exp_avg"] for p in dev_ps[:4]]
    assert _stacked_rows(rows) is not None  # one (4, 8, 64) tensor holds the group's m
    for a, b in zip(dev_ps, host_ps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for x, y in zip(dev.moments(a), host.moments(b), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)

    before = [t.clone() for p in dev_ps for t in dev.moments(p)]
    _run(dev, dev_ps, [3], nan_at=3)  # a NaN in "a1": the step is skipped on the device
    assert all(torch.equal(x, y) for x, y in zip(before, [t for p in dev_ps for t in dev.moments(p)]))
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        assert dev.skipped_steps == 1

    buf = io.BytesIO()
    torch.save(dev.state_dict(), buf)
    fresh_ps = [p.detach().clone().requires_grad_() for p in dev_ps]
    fresh = _four(fresh_ps, names, _group_of_four()[2])
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    _run(dev, dev_ps, [4, 5]), _run(fresh, fresh_ps, [4, 5])
    for a, b in zip(dev_ps, fresh_ps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for x, y in zip(dev.moments(a), fresh.moments(b), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- 8-bit states: decided on the device too -----------------------------------------------------
def _8bit(ps: list[torch.Tensor], strength: str | None, min_8bit_size: int = 0, **kw) -> RoutedAdamW:
    """8-bit states on every tensor (min_8bit_size=0; 100 leaves the 16-element bias in fp32), with
    or without a projection."""
    if strength is None:
        return RoutedAdamW(ps, lr=1e-2, weight_decay=0.1, state_bits=8, min_8bit_size=min_8bit_size, **kw)
    return projected(ps, "decoupled", STRENGTHS[strength](), "in", state_bits=8, min_8bit_size=min_8bit_size,
                     **kw)


@pytest.mark.parametrize("strength", [None, "fixed", "overlap"])
def test_8bit_step_has_no_host_sync(strength):
    ps = params()
    opt = _8bit(ps, strength)
    assert syncs_per_step(opt, ps) == 0
    assert all("state1" in opt.state[p] for p in ps)  # the states are 8-bit


@pytest.mark.parametrize("strength", [None, "fixed", "overlap"])
@pytest.mark.parametrize("min_8bit_size", [0, 100])  # all 8-bit; 8-bit and fp32 in one group
def test_8bit_device_path_equals_the_host_path_and_skips_with_states_untouched(strength, min_8bit_size):
    """The 8-bit step decided on the device equals the host path's (nonfinite='raise'); a NaN step
    leaves p, the codes, the block scales and the step counts bit for bit as they were, and the run
    then equals one that never saw the bad step."""
    dev_ps, host_ps, ref_ps = params(), params(), params()
    dev, ref = _8bit(dev_ps, strength, min_8bit_size), _8bit(ref_ps, strength, min_8bit_size)
    host = _8bit(host_ps, strength, min_8bit_size, nonfinite="raise")
    for opt, ps in ((dev, dev_ps), (host, host_ps), (ref, ref_ps)):
        _run(opt, ps, [0, 1, 2])
    assert ["state1" in dev.state[p] for p in dev_ps] == [True, True, min_8bit_size == 0]
    for a, b in zip(dev_ps, host_ps, strict=True):  # (the pre-correction rounds: see the fp32 test)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for k, v in host.state[b].items():  # the codes equal, the block scales to rounding
            torch.testing.assert_close(dev.state[a][k], v, rtol=1e-6, atol=0)
    before = ([p.detach().clone() for p in dev_ps],
              [{k: v.clone() for k, v in dev.state[p].items()} for p in dev_ps])
    mode = CountSyncs()
    with mode:
        _run(dev, dev_ps, [3], nan_at=3)
    assert mode.syncs == 0
    for p, b, st in zip(dev_ps, *before, strict=True):
        assert torch.equal(p, b)
        assert all(torch.equal(dev.state[p][k], v) for k, v in st.items())  # codes, scales, step
    with pytest.warns(RuntimeWarning, match=r"skipped 1 step\(s\)"):
        assert dev.skipped_steps == 1
    _run(dev, dev_ps, [4, 5]), _run(ref, ref_ps, [4, 5])
    for a, b in zip(dev_ps, ref_ps, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(dev.state[a][k], v) for k, v in ref.state[b].items())
