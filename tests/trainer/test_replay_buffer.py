"""The replay buffer's seeded sampling and state, and replay gradients that leave .grad alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env
from safetensors.torch import load_file
from trainer_helpers import DOMAINS, lm_dataset, lora_model

import lora_cl
from lora_cl.trainer import ReplayBuffer, ReplayDataError, replay_gradients
from lora_cl.trainer.replay import label_tokens, replay_share


def test_buffer_keeps_a_seeded_fraction_of_at_least_one():
    buf = ReplayBuffer(fraction=0.1)
    assert buf.add_domain("a", list(range(50)), domain_index=0, seed=3) == 5
    assert buf.add_domain("b", list(range(4)), domain_index=1, seed=3) == 1  # round(0.4) -> 1
    again = ReplayBuffer(fraction=0.1)
    again.add_domain("a", list(range(50)), domain_index=0, seed=3)
    assert again.entries == buf.entries[:5]
    other = ReplayBuffer(fraction=0.1)
    other.add_domain("a", list(range(50)), domain_index=0, seed=4)
    assert other.entries != again.entries
    assert buf.sample(3, seed=7) == buf.sample(3, seed=7) and len(buf.sample(3, seed=7)) == 3
    assert len(buf.sample(100, seed=0)) == len(buf) == 6
    with pytest.raises(ReplayDataError, match="no indexable, non-empty"):
        buf.add_domain("c", [], domain_index=2)


def test_buffer_state_is_json_and_needs_its_datasets_back():
    buf = ReplayBuffer(fraction=0.5)
    buf.add_domain("a", ["x", "y", "z", "w"], domain_index=0)
    state = json.loads(json.dumps(buf.state_dict()))
    restored = ReplayBuffer()
    restored.load_state_dict(state)
    assert restored.entries == buf.entries and restored.fraction == 0.5
    with pytest.raises(ReplayDataError, match=r"replay\.datasets\[domain\]"):
        restored.sample(1, seed=0)
    restored.datasets["a"] = ["x", "y", "z", "w"]
    assert restored.sample(2, seed=1) == buf.sample(2, seed=1)


def test_callback_state_round_trip():
    callback = lora_cl.ContinualCallback()
    callback.domains = ["a", "b"]
    callback.replay.add_domain("a", [1, 2, 3], domain_index=0)
    callback.basis_build_seconds = {"a": 0.5, "b": 0.25}
    callback.bases_added = {"a": 4, "b": 4}
    callback.snapshots = {"a": {"w": torch.ones(2)}}
    state = callback.state_dict()
    assert "snapshots" not in state and json.loads(json.dumps(state)) == state
    fresh = lora_cl.ContinualCallback()
    fresh.load_state_dict(callback.state_dict(include_snapshots=True))
    assert fresh.domains == ["a", "b"] and fresh.domain_index == 2
    assert fresh.replay.entries == callback.replay.entries and fresh.bases_added == {"a": 4, "b": 4}
    assert torch.equal(fresh.snapshots["a"]["w"], torch.ones(2))


def test_replay_gradients_match_autograd_and_leave_grad_alone(tiny_factory):
    model, tok = lora_model(tiny_factory)
    model.eval()
    optimizer = lora_cl.make_optimizer(model, "replay")
    names, params = optimizer.routed_named_params()
    rows = lm_dataset(tok, DOMAINS["law"])
    batch = {k: torch.tensor(rows[:2][k]) for k in ("input_ids", "attention_mask", "labels")}
    sentinel = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinel):
        p.grad = s.clone()
    loss, grads = replay_gradients(model, batch, names, params)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, sentinel))
    assert not model.training  # mode restored
    for p in params:
        p.grad = None
    model.train()
    ref = model(**batch).loss
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)
    assert set(grads) == set(names)
    for n, p in zip(names, params):
        torch.testing.assert_close(grads[n], p.grad)
    _, clipped = replay_gradients(model, batch, names, params, max_norm=1e-3)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)


def test_replay_share_splits_one_draw_across_ranks():
    draw = list(range(5))
    shares = [replay_share(draw, 2, r) for r in range(2)]
    assert shares == [([0, 2, 4], True), ([1, 3], True)]
    assert replay_share(draw, 1, 0) == (draw, True)
    # fewer examples than ranks: every rank runs a forward (ZeRO-3 and FSDP2 gather in it), the
    # ranks past the draw's end with a weight of 0, so each example counts once
    assert [replay_share([7, 8], 3, r) for r in range(3)] == [([7], True), ([8], True), ([7], False)]
    assert replay_share([], 2, 1) == ([], False)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_ranks_replaying_shares_of_a_draw_equal_one_process(tmp_path: Path, test_cache_dir: Path, k: int):
    """3 gloo ranks replay their shares of a draw of k examples (2: fewer than the ranks; 4: shares
    of 2, 1, 1): the averaged, token-weighted replay gradient is one process's gradient of the draw."""
    worker = Path(__file__).with_name("replay_ranks_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "3", str(worker), str(tmp_path), str(k)], capture_output=True, text=True,
                          timeout=300, env=torchrun_env(test_cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "grads.safetensors"))
    names = [n[len("one."):] for n in got if n.startswith("one.")]
    assert len(names) > 2
    for n in names:
        torch.testing.assert_close(got[f"ranks.{n}"], got[f"one.{n}"], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_label_tokens_counts_what_the_shifted_loss_averages():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    assert label_tokens({"labels": labels}) == 4  # after the one-token shift: 6, 7 | 1, 2
    assert label_tokens({"input_ids": labels}) == 0


def test_a_replay_gradient_of_tensors_outside_the_model_is_an_error(tiny_factory):
    """Under DeepSpeed ZeRO the optimizer's groups hold flat partitions in place of the LoRA
    tensors: a replay gradient taken of those is empty, which must fail loudly (it used to mix in
    nothing, silently), and routed_model_params names the model's own tensors instead."""
    from lora_cl.trainer.callback import routed_model_params

    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "replay")
    names, params = optimizer.routed_named_params()
    rows = lm_dataset(tok, DOMAINS["law"])
    batch = {k: torch.tensor(rows[:2][k]) for k in ("input_ids", "attention_mask", "labels")}
    flat = [torch.zeros(sum(p.numel() for p in params), requires_grad=True)]  # a ZeRO partition
    with pytest.raises(RuntimeError, match="none of the 1 routed tensors .* is in the replay loss's graph"):
        replay_gradients(model, batch, names[:1], flat)
    group = optimizer.param_groups[0]
    group["params"] = flat  # as DeepSpeed leaves the group during a domain
    got_names, got = routed_model_params(optimizer, model)
    assert got_names == names and all(a is b for a, b in zip(got, params, strict=True))
    group["param_names"] = ["not.a.model.tensor", *names[1:]]
    with pytest.raises(RuntimeError, match="1 routed tensor name.* are not the model's"):
        routed_model_params(optimizer, model)
