"""SubspaceBank: merge semantics, persistence, memory accounting and input checks."""

from __future__ import annotations

import pytest
import torch
from subspace_helpers import orthonormal, projection

from lora_cl.subspace import SubspaceBank

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_one_domain_projector_is_that_domains_basis():
    bank = SubspaceBank()
    u = orthonormal(20, 5)
    s = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1])
    bank.add("a", NAME, u, s)
    pu, ps = bank.projector(NAME)
    torch.testing.assert_close(ps, s)
    # equal up to sign, column by column (weights are distinct and sorted)
    torch.testing.assert_close((pu * u).sum(0).abs(), torch.ones(5), atol=1e-5, rtol=0)
    got_u, got_s = bank.get("a", NAME)
    assert torch.equal(got_u, u) and torch.equal(got_s, s)


def test_accumulate_spans_union_replace_keeps_last():
    full = orthonormal(16, 6)
    u1, u2 = full[:, :3], full[:, 3:]
    acc, rep = SubspaceBank("accumulate"), SubspaceBank("replace")
    for bank in (acc, rep):
        bank.add("d1", NAME, u1)
        bank.add("d2", NAME, u2)
    pu, ps = acc.projector(NAME)
    assert pu.shape == (16, 6)
    torch.testing.assert_close(ps, torch.ones(6))
    torch.testing.assert_close(projection(pu), projection(full), atol=1e-5, rtol=0)
    ru, rs = rep.projector(NAME)
    torch.testing.assert_close(projection(ru), projection(u2), atol=1e-6, rtol=0)
    assert rs.shape == (3,)


def test_shared_direction_is_not_overweighted():
    full = orthonormal(10, 3)
    bank = SubspaceBank()
    bank.add("d1", NAME, full[:, :2])
    bank.add("d2", NAME, full[:, 1:])  # column 1 is in both domains
    _, s = bank.projector(NAME)
    torch.testing.assert_close(s, torch.ones(3))


def test_max_rank_and_cache_follow_version():
    bank = SubspaceBank(max_rank=4)
    full = orthonormal(12, 6)
    bank.add("d1", NAME, full[:, :3], torch.tensor([1.0, 0.9, 0.8]))
    first = bank.projector(NAME)
    assert bank.projector(NAME) is first  # cached
    v = bank.version
    bank.add("d2", NAME, full[:, 3:], torch.tensor([0.7, 0.6, 0.5]))
    assert bank.version == v + 1
    u, s = bank.projector(NAME)
    assert u.shape == (12, 4)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.9, 0.8, 0.7]))
    assert bank.projector(NAME, dtype=torch.float64)[0].dtype == torch.float64


def test_drop_domain():
    bank = SubspaceBank()
    full = orthonormal(8, 4)
    bank.add("d1", NAME, full[:, :2])
    bank.add("d2", NAME, full[:, 2:])
    bank.add("d2", "other", orthonormal(5, 1), side="out")
    bank.drop_domain("d2")
    assert bank.domains() == ["d1"] and not bank.has("other", "out")
    torch.testing.assert_close(projection(bank.projector(NAME)[0]),
                               projection(full[:, :2]), atol=1e-6, rtol=0)
    bank.drop_domain("d1")
    assert bank.projector(NAME) is None
    with pytest.raises(KeyError, match="known domains"):
        bank.drop_domain("nope")


def _filled_bank() -> SubspaceBank:
    bank = SubspaceBank("replace", max_rank=7)
    odd = ["päth/ü|x", "a.b|c", "with space"]
    for i, domain in enumerate(odd):
        bank.add(domain, NAME, orthonormal(32, 2 + i, seed=i),
                 torch.linspace(1.0, 0.2, 2 + i))
        bank.add(domain, NAME.replace("lora_A", "lora_B"), orthonormal(24, 2, seed=9 + i),
                 side="out")
    bank.add(odd[0], "x|y.z", orthonormal(4, 0))  # empty basis survives a round trip too
    return bank


def _assert_same(a: SubspaceBank, b: SubspaceBank) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v for k, v in sa.items() if k != "bases"} == \
        {k: v for k, v in sb.items() if k != "bases"}
    assert len(sa["bases"]) == len(sb["bases"])
    for ea, eb in zip(sa["bases"], sb["bases"], strict=True):
        assert (ea["domain"], ea["name"], ea["side"]) == (eb["domain"], eb["name"], eb["side"])
        assert torch.equal(ea["U"], eb["U"]) and torch.equal(ea["s"], eb["s"])


def test_save_load_round_trip_is_bit_exact(tmp_path):
    bank = _filled_bank()
    path = tmp_path / "sub" / "bases.safetensors"
    bank.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["bases.safetensors"]  # no temp left
    loaded = SubspaceBank.load(path)
    _assert_same(bank, loaded)
    assert loaded.mode == "replace" and loaded.max_rank == 7
    assert loaded.domains() == bank.domains() and loaded.names() == bank.names()


def test_state_dict_round_trip_and_weights_only(tmp_path):
    bank = _filled_bank()
    path = tmp_path / "opt.pt"
    torch.save(bank.state_dict(), path)
    other = SubspaceBank()
    v = other.version
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.version > v
    _assert_same(bank, other)


def test_memory_report_counts_dim_times_k_floats():
    bank = SubspaceBank()
    bank.add("d1", "w1", orthonormal(10, 3))
    bank.add("d1", "w2", orthonormal(7, 2), side="out")
    bank.add("d2", "w1", orthonormal(10, 4, seed=1))
    r = bank.memory_report()
    assert r["per_domain"] == {"d1": (10 * 3 + 7 * 2) * 4, "d2": 10 * 4 * 4}
    assert r["total_bytes"] == (30 + 14 + 40) * 4 and r["tensors"] == 3
    assert r["per_name"] == {"w1": 70 * 4, "w2": 14 * 4}
    assert "MiB" in bank.format_memory_report()


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="accumulate.*replace"):
        SubspaceBank("union")
    bank = SubspaceBank()
    with pytest.raises(ValueError, match="not orthonormal"):
        bank.add("d", NAME, torch.ones(5, 2))
    with pytest.raises(ValueError, match="2-D"):
        bank.add("d", NAME, torch.ones(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bank.add("d", NAME, orthonormal(5, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="side"):
        bank.add("d", NAME, orthonormal(5, 2), side="left")
    bank.add("d", NAME, orthonormal(5, 2))
    with pytest.raises(ValueError, match="dim 6"):
        bank.add("e", NAME, orthonormal(6, 2))
    with pytest.raises(FileNotFoundError, match="subspace bank file not found"):
        SubspaceBank.load(tmp_path / "missing.safetensors")


def test_replace_mode_uses_the_latest_add_even_for_a_domain_added_again():
    """A domain added again (d0 after d1) is the latest: replace mode must project on its basis,
    not on d1's because d1 was first seen later; the order survives a save/load round trip."""
    gen = torch.Generator().manual_seed(0)
    first, second, again = (torch.linalg.qr(torch.randn(16, 3, generator=gen))[0] for _ in range(3))
    bank = SubspaceBank(mode="replace")
    bank.add("d0", "w", first)
    bank.add("d1", "w", second)
    bank.add("d0", "w", again)  # d0 re-run: its newest basis replaces d1's
    u, _ = bank.projector("w")
    torch.testing.assert_close(u @ u.T, again @ again.T, atol=1e-5, rtol=0)
    reloaded = SubspaceBank()
    reloaded.load_state_dict(bank.state_dict())
    u2, _ = reloaded.projector("w")
    torch.testing.assert_close(u2 @ u2.T, again @ again.T, atol=1e-5, rtol=0)


def test_add_reorthonormalises_a_nearly_orthonormal_basis():
    u = torch.linalg.qr(torch.randn(16, 4))[0] * (1 + 1e-4)  # within ORTHO_TOL
    bank = SubspaceBank()
    bank.add("d0", "w", u)
    stored, _ = bank.get("d0", "w")
    torch.testing.assert_close(stored.T @ stored, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(stored, u, atol=1e-3, rtol=0)  # same span and signs
