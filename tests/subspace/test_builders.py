"""basis_from_rows and GradientRowBuffer: subspace recovery, determinism, ring-buffer semantics."""

from __future__ import annotations

import pytest
import torch
from helpers import grad_batch, torch_round_trip
from subspace_helpers import orthonormal, projection

from lora_cl.subspace import GradientRowBuffer, SubspaceBank, basis_from_rows


def low_rank_rows(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples spanning exactly the random k-dim subspace U_true (d, k) with spread spectrum."""
    g = torch.Generator().manual_seed(seed)
    u = orthonormal(d, k, seed)
    coef = torch.randn(n, k, generator=g) * torch.linspace(3.0, 1.0, k)
    return coef @ u.T, u


@pytest.mark.parametrize("rule", [{"rank": 5}, {"rank": 32}, {"energy": 0.999999}])
def test_recovers_known_subspace(rule):
    rows, u_true = low_rank_rows(200, 48, 5)
    u, s = basis_from_rows(rows, **rule)
    assert u.shape == (48, 5)  # rank 32 still drops the 43 null directions
    torch.testing.assert_close(u.T @ u, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_norm(projection(u_true) - projection(u)) < 1e-4
    assert s[0] == 1 and (s[:-1] >= s[1:]).all()


def test_energy_rule_picks_smallest_k():
    # orthogonal directions with energies 64, 16, 9, 4: cumulative 64, 80, 89, 93 (of 93)
    u = orthonormal(30, 4, seed=3)
    sig = torch.tensor([8.0, 4.0, 3.0, 2.0])
    rows = (orthonormal(50, 4, seed=4) * sig) @ u.T
    for energy, k in [(0.68, 1), (0.70, 2), (0.86, 2), (0.87, 3), (0.96, 4), (1.0, 4)]:
        assert basis_from_rows(rows, rank=None, energy=energy)[0].shape[1] == k


def test_deterministic_and_leaves_global_rng_alone():
    rows = torch.randn(100, 40, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = basis_from_rows(rows, rank=8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = basis_from_rows(rows, rank=8, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_zero_rows_and_bad_arguments():
    u, s = basis_from_rows(torch.zeros(10, 6))
    assert u.shape == (6, 0) and s.shape == (0,)
    assert basis_from_rows(torch.zeros(0, 6))[0].shape == (6, 0)
    with pytest.raises(ValueError, match="either rank or energy"):
        basis_from_rows(torch.randn(4, 3), rank=2, energy=0.9)
    with pytest.raises(ValueError, match="2-D"):
        basis_from_rows(torch.randn(4))
    with pytest.raises(ValueError, match="non-finite"):
        basis_from_rows(torch.tensor([[1.0, float("nan")]]))


def _batch(names, grads, step=1):
    return grad_batch(grads, names, step=step)


def test_buffer_keeps_every_row_while_under_the_cap_and_is_an_observer():
    buf = GradientRowBuffer("in", max_rows=8, window_steps=3, rank=2)
    seen = []
    for step in range(4):  # 2 rows per step of a (2, 3) "LoRA A" gradient
        g = torch.full((2, 3), float(step)) + torch.tensor([[0.0], [0.5]])
        seen.append(g.tolist())
        batch = _batch(["a", "bias", "thin"], [g, torch.ones(3), torch.ones(4, 2)], step)
        out = buf(batch)
        assert all(o is r for o, r in zip(out, batch.grads, strict=True))
    assert buf.names() == ["a"]  # 1-D skipped; "thin" has fan-in 2 <= min_dim (= rank 2)
    # the window is 3 steps: steps 1-3, all of their rows (6 <= the cap of 8), oldest first
    assert buf.rows("a").tolist() == [r for step in seen[-3:] for r in step]
    assert buf.metrics()["rows_buffered"] == 6


def test_buffer_window_counts_steps_and_subsamples_to_the_cap():
    """256 steps of 16 rows (r = 16) under a 256-row cap: one row from each of the last 256 steps,
    where the old row-count buffer kept only the last 16 steps."""
    buf = GradientRowBuffer("in", max_rows=256, window_steps=256, rank=4)
    for step in range(300):
        buf(_batch(["a"], [torch.full((16, 8), float(step))]))
    rows = buf.rows("a")
    assert rows.shape == (256, 8)
    assert rows[:, 0].tolist() == [float(s) for s in range(44, 300)]  # one row of each step
    short = GradientRowBuffer("in", max_rows=256, window_steps=256, rank=4)
    for step in range(40):  # a 40-step domain: the whole domain, 6 rows of each step (240 <= 256)
        short(_batch(["a"], [torch.full((16, 8), float(step))]))
    steps = short.rows("a")[:, 0]
    assert short.rows("a").shape[0] <= 256 and set(steps.tolist()) == {float(s) for s in range(40)}
    assert all((steps == s).sum() == (steps == 0).sum() for s in range(40))  # equal share per step


def test_buffer_out_side_and_name_filter():
    buf = GradientRowBuffer("out", max_rows=8, rank=None, energy=0.9,
                            only_names=lambda n: n.endswith("lora_B"))
    g = torch.arange(12.0).reshape(4, 3)  # (fan_out=4, r=3)
    buf(_batch(["x.lora_B", "x.lora_A"], [g, g]))
    assert buf.names() == ["x.lora_B"]
    assert torch.equal(buf.rows("x.lora_B"), g.T)  # samples live in the fan-out space


def test_buffer_state_dict_resumes_exactly_and_builds():
    rows, u_true = low_rank_rows(40, 24, 3, seed=5)
    grads = rows.reshape(10, 4, 24)
    full = GradientRowBuffer(max_rows=16, window_steps=8, rank=3)
    half = GradientRowBuffer(max_rows=16, window_steps=8, rank=3)
    for i, g in enumerate(grads):
        full(_batch(["w"], [g]))
        if i < 5:
            half(_batch(["w"], [g]))
    resumed = GradientRowBuffer(max_rows=16, window_steps=8, rank=3)
    resumed.load_state_dict(torch_round_trip(half.state_dict()))
    for g in grads[5:]:
        resumed(_batch(["w"], [g]))
    assert torch.equal(resumed.rows("w"), full.rows("w"))

    bank = SubspaceBank()
    assert full.build(bank, "d1") == 1
    assert full.names() == [] and bank.domains() == ["d1"]
    u, _ = bank.get("d1", "w")
    assert torch.linalg.matrix_norm(projection(u_true) - projection(u)) < 1e-4
    with pytest.raises(ValueError, match="max_rows"):
        GradientRowBuffer(max_rows=8, window_steps=8).load_state_dict(half.state_dict())
    with pytest.raises(ValueError, match="window_steps"):
        GradientRowBuffer(max_rows=16).load_state_dict(half.state_dict())


def test_on_domain_start_clears():
    buf = GradientRowBuffer(max_rows=4, rank=1)
    buf(_batch(["w"], [torch.randn(3, 5)]))
    buf.on_domain_start("next")
    assert buf.names() == [] and buf.build(SubspaceBank(), "next") == 0


def test_row_buffer_thins_where_the_gradient_lives_and_moves_only_kept_rows():
    """Each step's rows are subsampled on the gradient's device and only the kept ones travel to
    the buffer's device (here from the CPU to the meta device; from a GPU the copy is also
    non-blocking, into pinned memory: benchmarks/gpu_parity.py checks it there)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Moves(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            to_meta = (kwargs or {}).get("device") == torch.device("meta")
            if func is torch.ops.aten._to_copy.default and to_meta and args[0].is_floating_point():
                self.rows.append(args[0].shape[0])  # (not the thinning's index tensors)
            return func(*args, **(kwargs or {}))

    buf = GradientRowBuffer("in", max_rows=8, window_steps=8, rank=2, device="meta")
    moves = Moves()
    with moves:
        for t in range(6):
            buf.push("w", torch.randn(4, 16, generator=torch.Generator().manual_seed(t)))
    # steps 1-3 move all 4 rows; the third overfills the cap of 8 (quota 8 -> 2), the fifth too (-> 1)
    assert moves.rows == [4, 4, 4, 2, 2, 1]
    assert [s.shape[0] for s in buf._slots["w"]] == [1] * 6 and buf._slots["w"][0].device.type == "meta"
