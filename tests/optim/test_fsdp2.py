"""RoutedAdamW steps FSDP2 (``fully_shard``) DTensor parameters as one process steps whole ones.

Real torchrun, 2 gloo ranks on CPU, ``fully_shard`` on a 1-D CPU mesh (the Trainer drops FSDP on
CPU, ../shared/STACK.md, so the worker shards the model itself). Every routing with no modifier
and with a projection on each side, fixed and overlap-adaptive; a NaN in one rank's shard skips
the step on both.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN2, torchrun_env
from safetensors.torch import load_file

from lora_cl import RoutedAdamW

WORKER = Path(__file__).with_name("fsdp2_worker.py")
REPO = WORKER.parents[2]


def _torchrun(worker: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**torchrun_env(None, WORKER.parent), **extra_env}
    return subprocess.run([*TORCHRUN2, str(worker), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2") / "results.json"
    proc = _torchrun(WORKER, str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cases(results: dict) -> list[dict]:
    return results["cases"]


def _case(cases: list[dict], routing: str, side: str | None, strength: str | None,
          nan_at: int | None = None, state_bits: int = 32) -> dict:
    (row,) = [r for r in cases if (r["routing"], r["side"], r["strength"], r["nan_at"], r["state_bits"])
              == (routing, side, strength, nan_at, state_bits)]
    return row


@pytest.mark.parametrize("routing", ["vanilla", "shared", "decoupled", "v_only"])
def test_no_modifier_equals_one_process(cases, routing):
    row = _case(cases, routing, None, None)
    assert row["sharded"] == "DTensor" and "Shard(dim=0)" in row["placements"]
    assert row["max_err"] <= 1e-4 * row["max_abs"], row


@pytest.mark.parametrize("routing", ["shared", "decoupled", "v_only"])
@pytest.mark.parametrize("side", ["in", "out", "both"])
@pytest.mark.parametrize("strength", ["fixed", "overlap"])
def test_projection_equals_one_process(cases, routing, side, strength):
    row = _case(cases, routing, side, strength)
    assert row["max_err"] <= 1e-4 * row["max_abs"], row
    assert row["strength_same_on_ranks"] and row["strength_same_as_whole"], row
    assert row["skipped"] == 0 and row["global_step"] == row["whole_global_step"] == 4


def test_the_comparison_tells_routings_apart(cases):
    """The parity above is not vacuous: the routings end at different weights."""
    finals = {r["routing"]: torch.tensor(r["final"]["a.weight"]) for r in cases
              if r["side"] == "both" and r["strength"] == "overlap" and r["nan_at"] is None
              and r["state_bits"] == 32}
    assert len(finals) == 3
    for x in finals:
        for y in finals:
            if x < y:
                assert (finals[x] - finals[y]).abs().max() > 1e-3, (x, y)


@pytest.mark.parametrize("routing", ["shared", "decoupled"])
@pytest.mark.parametrize("side", [None, "both"])
def test_8bit_states_on_shards_equal_one_process(cases, routing, side):
    """state_bits=8 on DTensor shards, blockwise over each rank's local shard. Where every 8-bit
    shard holds whole 256-element blocks (a and b, 512 elements a shard; the small tensors fp32)
    the blocks are the whole tensor's and the run equals the one-process 8-bit run; with every
    tensor in 8-bit (the odd one and the norm: one block in one process, one per shard) it stays
    within 8-bit noise of it (measured: 1.4e-3 of the largest weight at most)."""
    strength = "overlap" if side else None
    aligned = _case(cases, routing, side, strength, state_bits=8)
    assert "DTensor" in aligned["state_types"] and aligned["skipped"] == 0, aligned
    assert max(aligned["err"].values()) <= 1e-6 * aligned["max_abs"], aligned
    every = _case(cases, routing, side, strength, state_bits=80)
    assert max(every["err"].values()) <= 1e-2 * every["max_abs"], every


@pytest.mark.parametrize("side", [None, "both"])
def test_nan_on_one_rank_skips_the_step_on_both(cases, side):
    row = _case(cases, "decoupled", side, "overlap" if side else None, nan_at=1)
    assert row["skipped"] == 1 and row["global_step"] == row["whole_global_step"] == 3, row
    assert row["max_err"] <= 1e-4 * row["max_abs"], row  # as the whole run without that step


def test_peft_model_with_the_ogp_preset_equals_one_process(results):
    """docs/guides/fsdp.md's example: fully_shard per decoder layer of a peft Llama,
    make_optimizer("ogp"), bases built after 3 steps from the buffered rows, 3 projected steps."""
    row = results["peft_ogp"]
    assert row["sharded"] == "DTensor" and row["routed"] == 8, row
    assert row["projected"] and row["projected"] > 0, row
    assert row["max_err"] <= 1e-4 * row["max_abs"], row


@pytest.mark.parametrize("bits", ["32", "80"])
def test_kill_9_and_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(tmp_path, bits):
    """3 steps, a torch.distributed.checkpoint save (lora_cl.optim.dtensor.sharded_state_dict),
    rank 1 SIGKILLed; a fresh launch loads it and finishes: the same weights as 6 steps straight
    (the modifier chain's state, which torch's optimizer state dict drops, included). fp32 states,
    and 8-bit ones on every tensor (codes and block scales saved sharded)."""
    worker = WORKER.with_name("fsdp2_resume_worker.py")
    bits_env = {"FSDP2_STATE_BITS": bits}
    full = _torchrun(worker, "full", str(tmp_path / "full.safetensors"), **bits_env)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = _torchrun(worker, "kill", str(tmp_path / "ckpt"), **bits_env)
    assert killed.returncode != 0 and (tmp_path / "ckpt").is_dir()
    resumed = _torchrun(worker, "resume", str(tmp_path / "ckpt"), str(tmp_path / "resumed.safetensors"),
                        **bits_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want, got = (load_file(str(tmp_path / f"{k}.safetensors")) for k in ("full", "resumed"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_dtensor_refusals_name_what_works():
    """Checked in this process: a mesh of 1 is enough to make DTensor parameters."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:  # (a tcp:// address, not MASTER_* variables the later subprocess tests would inherit)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def param() -> torch.nn.Parameter:
            p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
            p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
            return p

        with pytest.raises(ValueError, match="reproject_update=True with FSDP2 .* use reproject_upd"):
            RoutedAdamW([param()], reproject_update=True).step()
        opt = RoutedAdamW([param()], lr=0.1)
        opt.step()  # a mesh of 1: the sharded code path, stepping
        assert opt.global_step == 1
    finally:
        if created:
            dist.destroy_process_group()


def test_a_step_gathers_every_sharded_tensor_in_one_all_gather(results):
    """The chain sees whole gradients and parameters: 3 routed DTensors (one with uneven row
    chunks) x 2 used to be 6 all-gathers a step (DTensor.full_tensor each); whole_many sends one,
    and the parity tests above check what it reassembles."""
    assert results["gathers_per_step"] == {"all_gather": 1, "full_tensor": 0}
    assert results["whole_many_edges_equal"]  # rows < ranks, 1-D, 3-D, two dtypes, replicated
