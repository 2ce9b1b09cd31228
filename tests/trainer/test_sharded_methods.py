"""Replay and importance (EWC) methods under sharding: `lora-cl train` on 2 gloo ranks under ZeRO-2,
ZeRO-3 (every LoRA tensor partitioned) and FSDP2, the last two with gradient accumulation 2, equals
one process, for the whole 3-domain stream (real torchrun, DeepSpeed and accelerate's FSDP2 on CPU).

The ranks replay disjoint shares of one draw (seeded by the step, not the rank) and weight their
replay gradients by their share of its label tokens, so 2 ranks x 2 replayed examples are one
process's 4; EWC consolidates the whole fp32 weights at each domain's end on every rank.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN2, assert_same_adapters, domain_adapters, torchrun_env, zero3_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# fp32 end to end; 2 ranks average 2 + 2 examples where one process takes 4 at once
TOL = dict(rtol=1e-4, atol=1e-5)
LAUNCH = TORCHRUN2
# a buffer of every earlier example (fraction 1), so the draw of 4 differs from step to step
REPLAY = "method={name: replay, label: replay, replay_fraction: 1.0, replay_batch_size: %d}"


def _common(per_rank_replay: int, compare: str) -> list[str]:
    return ["train", str(REPO / "recipes" / "tiny.yaml"), "--no-progress", "--set", "training.lr=1e-3",
            "--set", "data.train_examples=8", "--set", REPLAY % per_rank_replay, "--set", compare]


def _run(args: list[str], cache: Path) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=torchrun_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]




@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, test_cache_dir: Path) -> Path:
    """One process x 4 examples (replay 4 a step): replay, ewc, and vanilla (what they must differ from)."""
    out = tmp_path_factory.mktemp("sharded-methods") / "one"
    _run([sys.executable, "-m", "lora_cl.cli", *_common(4, "compare=[ewc, vanilla]"), "--output", str(out)],
         test_cache_dir)
    return out


def test_the_check_can_tell_replay_and_ewc_from_vanilla(single: Path) -> None:
    vanilla = domain_adapters(single / "vanilla")
    for method in ("replay", "ewc"):
        got = domain_adapters(single / method)
        # domain 1 has nothing to replay or protect yet; later domains must differ from vanilla
        assert max(float((got["01-astronomy"][k] - vanilla["01-astronomy"][k]).abs().max())
                   for k in vanilla["01-astronomy"]) > 1e-3, method


LAUNCHES = {
    "zero2": ["--set", "training.batch_size=2", "--set", "training.deepspeed=deepspeed_configs/zero2.json"],
    "zero3-accum2": ["--set", "training.batch_size=1", "--set", "training.grad_accum=2"],  # + its config
    "fsdp2-accum2": ["--set", "training.batch_size=1", "--set", "training.grad_accum=2",
                     "--set", "training.fsdp=true"],
}


@pytest.mark.parametrize("launch", [pytest.param(name, marks=pytest.mark.deepspeed) if name.startswith("zero")
                                    else name for name in LAUNCHES])
def test_replay_and_ewc_under_sharding_equal_one_process(single: Path, tmp_path: Path, test_cache_dir: Path,
                                                         launch: str) -> None:
    """2 ranks x 2 examples (ZeRO-3 and FSDP2: x 1 example x 2 accumulation steps), each replaying
    2 examples a step, equal one process x 4 replaying 4: every domain's adapter, for replay and
    ewc."""
    extra = list(LAUNCHES[launch])
    if launch.startswith("zero3"):
        extra += ["--set", f"training.deepspeed={zero3_config(tmp_path, persistence=0)}"]
    two = tmp_path / "two"
    _run([*LAUNCH, "-m", "lora_cl.cli", *_common(2, "compare=[ewc]"), *extra, "--output", str(two)],
         test_cache_dir)
    for method in ("replay", "ewc"):
        want, got = domain_adapters(single / method), domain_adapters(two / method)
        assert want.keys() == got.keys() and len(want) == 3
        for ddir in want:
            for name in want[ddir]:
                torch.testing.assert_close(got[ddir][name], want[ddir][name], **TOL,
                                           msg=lambda m, n=name, d=ddir, k=method: f"{k} {d} {n}: {m}")


@pytest.mark.deepspeed
def test_replay_under_zero3_resumes_after_kill_9(tmp_path: Path, test_cache_dir: Path) -> None:
    """Both ranks killed with SIGKILL at the third domain's step 4 (its replay buffer holds both
    earlier domains; ZeRO-3, gradient accumulation 2), then `--resume` from its step-3 checkpoint:
    every domain's adapter equals the uninterrupted 2-rank run's (the buffer and the step-seeded
    draws come back as they were)."""
    common = [*_common(2, "compare=[]"), *LAUNCHES["zero3-accum2"],
              "--set", f"training.deepspeed={zero3_config(tmp_path, persistence=0)}"]
    fault_cli = Path(__file__).with_name("fault_cli.py")
    killed = subprocess.run([*LAUNCH, str(fault_cli), "kill:2:4", *common, "--output",
                             str(tmp_path / "killed")], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=torchrun_env(test_cache_dir))
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    ckpt = tmp_path / "killed" / "replay" / "checkpoints" / "02-law" / "checkpoint-3"
    assert ckpt.is_dir(), "the kill came before the checkpoint"
    _run([*LAUNCH, "-m", "lora_cl.cli", *common, "--output", str(tmp_path / "killed"), "--resume"],
         test_cache_dir)
    _run([*LAUNCH, "-m", "lora_cl.cli", *common, "--output", str(tmp_path / "whole")], test_cache_dir)
    assert_same_adapters(tmp_path / "killed" / "replay", tmp_path / "whole" / "replay")
