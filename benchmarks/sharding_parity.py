"""Sharded streams against one process: `lora-cl train` of the tiny recipe's streams (3 domains,
one Trainer each, evaluation, domain directories; ogp, and replay and EWC) under torchrun with N
ranks, for every sharding lora-cl routes under, against the one-process run with the same global
batch and settings.

    python benchmarks/sharding_parity.py [--ranks 2] [--out docs/sharding.md]

On a CPU the ranks use gloo; on a machine with N GPUs, nccl (one rank per GPU). Writes the page
(a generated table: every figure on it comes from this run) and its JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "deepspeed_configs" / "zero2.json")
BITS8 = ("training.state_bits=8", "training.min_8bit_size=0")
#: the replay preset with every earlier example in its buffer, so each step's draw differs (the
#: ranks replay their per-device batch each, together what one process replays), and EWC beside it
REPLAY_EWC = ("method={name: replay, label: replay, replay_fraction: 1.0}", "compare=[ewc]")
#: label -> (extra --set keys of the sharded run, extra keys shared with its 1-process reference,
#: the methods compared)
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "DDP (no sharding)": ((), (), ("ogp",)),
    "ZeRO-2 (`zero2.json`)": ((f"training.deepspeed={ZERO2}",), (), ("ogp",)),
    "ZeRO-3 (every LoRA tensor partitioned)": (("training.deepspeed={zero3}",), (), ("ogp",)),
    "ZeRO-3, 4-bit (nf4) base": (("training.deepspeed={zero3}",), ("model.quantization=4bit",), ("ogp",)),
    "ZeRO-2, 8-bit states": ((f"training.deepspeed={ZERO2}",), BITS8, ("ogp",)),
    "ZeRO-3, 8-bit states": (("training.deepspeed={zero3}",), BITS8, ("ogp",)),
    "FSDP2 (`training.fsdp`)": (("training.fsdp=true",), (), ("ogp",)),
    "FSDP2, 4-bit (nf4) base": (("training.fsdp=true",), ("model.quantization=4bit",), ("ogp",)),
    # r=8: lora_A (8 x 64) and q's lora_B (64 x 8) shard into whole 256-element blocks; v's lora_B
    # (32 x 8) into half blocks, whose block scales differ from one process's
    "FSDP2, 8-bit states": (("training.fsdp=true",), (*BITS8, "lora.r=8"), ("ogp",)),
    "ZeRO-2": ((f"training.deepspeed={ZERO2}",), REPLAY_EWC, ("replay", "ewc")),
    "ZeRO-3": (("training.deepspeed={zero3}",), REPLAY_EWC, ("replay", "ewc")),
    "FSDP2": (("training.fsdp=true",), REPLAY_EWC, ("replay", "ewc")),
}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _train(out: Path, sets: list[str], ranks: int | None) -> float:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
              if ranks else [sys.executable])
    args = ["-m", "lora_cl.cli", "train", str(REPO / "recipes" / "tiny.yaml"), "--no-progress",
            "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=_env())
    if proc.returncode != 0:
        sys.exit(f"{' '.join(sets)}: failed\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _compare(one: Path, two: Path) -> dict[str, float]:
    worst = moved = 0.0
    for ddir in sorted((one / "domains").iterdir()):
        want = load_file(str(ddir / "adapter" / "adapter_model.safetensors"))
        got = load_file(str(two / "domains" / ddir.name / "adapter" / "adapter_model.safetensors"))
        worst = max(worst, max(float((got[k] - want[k]).abs().max()) for k in want))
        moved = max(moved, max(float(t.abs().max()) for t in want.values()))
    m1, m2 = (json.loads((d / "matrix.json").read_text())["metrics"]["loss"]["R"] for d in (one, two))
    loss = float((torch.tensor(m1) - torch.tensor(m2)).abs().max())
    return {"max_abs_diff": worst, "max_abs_weight": moved, "loss_matrix_max_diff": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "sharding.md"))
    args = ap.parse_args()
    n = args.ranks
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-cl-sharding-") as tmp:
        work = Path(tmp)
        zero3 = work / "zero3.json"
        doc = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
        doc["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # no LoRA tensor whole
        zero3.write_text(json.dumps(doc))
        common = ["compare=[]", "training.lr=1e-3", f"data.train_examples={8 * n}"]
        references: dict[tuple[str, ...], Path] = {}
        for k, (label, (sharded, shared, methods)) in enumerate(CASES.items()):
            if shared not in references:
                references[shared] = work / f"one-{len(references)}"
                _train(references[shared], [*common, "training.batch_size=" + str(n), *shared], None)
            out = work / f"case-{k}"
            seconds = _train(out, [*common, "training.batch_size=1",
                                   *(s.format(zero3=zero3) for s in sharded), *shared], n)
            for method in methods:
                result = {"label": label, "method": method, "sets": [*sharded, *shared],
                          "seconds": seconds, **_compare(references[shared] / method, out / method)}
                rows.append(result)
                print(f"{label}, {method}: {result['max_abs_diff']:.2g} (weights up to "
                      f"{result['max_abs_weight']:.2g}), {seconds:.0f} s", flush=True)
    device = (f"{n} x {torch.cuda.get_device_name(0)} (nccl)" if torch.cuda.is_available()
              else f"{n} gloo ranks on a CPU ({platform.machine()}, {os.cpu_count()} cores)")
    lines = [
        "# Sharded streams against one process",
        "",
        "Generated by `python benchmarks/sharding_parity.py` (about 4 minutes on 2 CPU cores); every "
        "figure below comes from that run. Each row trains a stream of the tiny recipe (3 domains "
        f"of 6 steps, one Trainer each, evaluation after every domain) with `lora-cl train` under "
        f"`torchrun` on {device}, one example per rank, and the same stream in one process with the "
        f"global batch ({n} examples); the columns are the largest difference of any domain's "
        "adapter tensor and of the loss matrix. fp32 runs differ only in the order of the gradient "
        "reduction (ZeRO gathers whole tensors, so its 8-bit blocks are one process's). FSDP2 "
        "quantizes each rank's shard: where a shard holds whole 256-element blocks they are one "
        "process's blocks, where it does not (here v_proj's 32 x 8 lora_B, half a block per rank) "
        "the block scales differ, which shows as 8-bit noise. The replay rows keep every earlier "
        "example in the buffer (`replay_fraction: 1.0`), so each step replays another draw: one "
        f"process replays {n} examples a step, each rank its share of the same {n}, weighted by its "
        "label tokens; EWC consolidates the whole weights at each domain's end. The tests "
        "(`tests/trainer/test_deepspeed.py`, `tests/trainer/test_fsdp_stream.py`, "
        "`tests/trainer/test_sharded_methods.py`) check the same comparisons with their tolerances, "
        "and resumes after kill -9.",
        "",
        f"Device: {device}; torch {torch.__version__}.",
        "",
        "| sharding | method | settings beside it | adapters: max abs diff | largest weight "
        f"| loss matrix: max diff | {n}-rank run, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = ", ".join(f"`{s}`" for s in r["sets"] if not s.startswith((
            "training.deepspeed", "training.fsdp", "method=", "compare="))) or "-"
        lines.append(f"| {r['label']} | {r['method']} | {extra} | {r['max_abs_diff']:.2g} | "
                     f"{r['max_abs_weight']:.2g} | {r['loss_matrix_max_diff']:.2g} | {r['seconds']:.0f} |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n",
                                        encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
