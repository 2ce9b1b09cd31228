"""Worker for test_fsdp2.py: RoutedAdamW on FSDP2 (``fully_shard``) parameters, 2 gloo ranks.

Run under ``torchrun --nproc_per_node 2``. For every case it trains the same model twice: once
sharded with ``fully_shard`` on a 1-D CPU mesh (each rank its half of every batch: FSDP2
averages the gradients) and once whole in this process (the full batch), and writes, from rank
0, the largest difference of the final weights and what the test checks beside it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lora_cl import FixedStrength, OverlapAdaptiveStrength, Projection, RoutedAdamW, SubspaceBank

# LoRA-like shapes, one with an odd first dim (uneven Shard(0) chunks), and a 1-D weight
SHAPES = {"a": (16, 64), "b": (64, 16), "odd": (7, 16)}
STEPS = 4
BATCH = 8
#: LORA_CL_FSDP_DEVICE=cuda (benchmarks/gpu_checks.sh): nccl and a CUDA mesh, one rank per GPU
DEVICE = os.environ.get("LORA_CL_FSDP_DEVICE", "cpu")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 16, bias=False)
        self.b = torch.nn.Linear(16, 64, bias=False)
        self.odd = torch.nn.Linear(16, 7, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return (self.b(h) * self.norm).square().mean() + self.odd(h).square().mean()


def bank(side: str) -> SubspaceBank:
    gen = torch.Generator().manual_seed(1)
    out = SubspaceBank()
    for name, (rows, cols) in SHAPES.items():
        for s in (("in", "out") if side == "both" else (side,)):
            dim = cols if s == "in" else rows
            out.add("old", f"{name}.weight", torch.linalg.qr(torch.randn(dim, 4, generator=gen))[0], side=s)
    return out


def optimizer(model: torch.nn.Module, routing: str, side: str | None, strength: str | None,
              state_bits: int = 32) -> RoutedAdamW:
    named = dict(model.named_parameters())
    routed = [n for n in named if n != "norm"]
    mods = []
    if side is not None:
        make = {"fixed": lambda: FixedStrength(0.5),
                "overlap": lambda: OverlapAdaptiveStrength(0.5, beta=0.9)}[strength]
        mods = [Projection(bank(side), strength=make(), side=side)]
    groups = [{"params": [named[n] for n in routed], "param_names": routed},
              {"params": [named["norm"]], "param_names": ["norm"], "routing": "vanilla"}]
    # 8: a and b (1,024 elements) in 8-bit, the rest fp32; 80: every tensor in 8-bit
    bits = {"state_bits": 8, "min_8bit_size": 256 if state_bits == 8 else 0} if state_bits != 32 else {}
    return RoutedAdamW(groups, lr=1e-2, weight_decay=0.1, routing=routing, modifiers=mods, **bits)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, 64, generator=gen).to(DEVICE) for _ in range(STEPS)]


def train(model: torch.nn.Module, opt: RoutedAdamW, rank: int | None, nan_at: int | None) -> None:
    for t, x in enumerate(batches()):
        halves = x.chunk(WORLD)
        if rank is not None:  # this rank's share of the batch; FSDP2 averages the gradients
            model(halves[rank]).backward()
        else:  # the same shares' gradients, averaged (as FSDP2's reduce-scatter does)
            for half in halves:
                model(half).backward()
            for p in model.parameters():
                p.grad.mul_(1 / WORLD)
        if t == nan_at:
            if rank is None:
                opt.zero_grad()  # the whole-model run: the step the sharded run skips, not taken
                continue
            if rank == WORLD - 1:  # a NaN in the last rank's shard only: every rank must skip
                model.a.weight.grad.to_local()[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def strength_state(opt: RoutedAdamW) -> Any:
    for m in opt.modifiers:
        if isinstance(m, Projection):
            return m.strength.state_dict()
    return None


def gathers_per_step(mesh: Any, rank: int) -> dict[str, int]:
    """Gathers one projection step of the sharded Net makes: all-gathers (``dist.all_gather``,
    what ``lora_cl.optim.dtensor.whole_many`` sends) and per-tensor ``DTensor.full_tensor`` calls."""
    from torch.distributed.tensor import DTensor

    model = Net().to(DEVICE)
    for module in (model.a, model.b, model.odd, model):
        fully_shard(module, mesh=mesh)
    opt = optimizer(model, "decoupled", "both", "overlap")
    counts = {"all_gather": 0, "full_tensor": 0}
    x = batches()[0].chunk(WORLD)[rank]
    model(x).backward()
    opt.step()  # (the first step builds the states)
    opt.zero_grad()
    model(x).backward()
    all_gather, full_tensor = dist.all_gather, DTensor.full_tensor

    def counted_all_gather(*args: Any, **kwargs: Any) -> Any:
        counts["all_gather"] += 1
        return all_gather(*args, **kwargs)

    def counted_full_tensor(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["full_tensor"] += 1
        return full_tensor(self, *args, **kwargs)

    dist.all_gather, DTensor.full_tensor = counted_all_gather, counted_full_tensor
    try:
        opt.step()
    finally:
        dist.all_gather, DTensor.full_tensor = all_gather, full_tensor
    return counts


def whole_many_edges(mesh: Any) -> bool:
    """dtensor.whole_many against DTensor.full_tensor on awkward shapes: fewer rows than ranks (a
    rank with an empty shard), 1-D, 3-D, uneven chunks, two dtypes, a replicated DTensor and a
    plain tensor among them."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lora_cl.optim import dtensor as dt

    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 5), (3,), (2, 3, 4), (7, 16), (5, 2)]
    whole = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    tensors = [distribute_tensor(t, mesh, [Shard(0)]) for t in whole]
    tensors[-1] = distribute_tensor(whole[-1].double(), mesh, [Shard(0)])
    tensors.append(distribute_tensor(whole[0], mesh, [Replicate()]))
    tensors.append(whole[1])
    got = dt.whole_many(tensors)
    want = [t.full_tensor() if dt.is_dtensor(t) else t for t in tensors]
    return all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True))


def peft_ogp(mesh: Any, rank: int) -> dict[str, Any]:
    """The guide's example: a tiny peft Llama, fully_shard per decoder layer, make_optimizer("ogp");
    a domain's gradient-row bases built from the (whole, gathered) rows, then a projected domain."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_cl
    from lora_cl.subspace import GradientRowBuffer
    from lora_cl.trainer.optimizer_factory import bank_of

    def build() -> Any:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
        return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def train(model: Any, sharded: bool) -> tuple[dict[str, torch.Tensor], Any]:
        opt = lora_cl.make_optimizer(model, "ogp", lr=1e-2)
        for t in range(6):
            if t == 3:  # the end of domain 0: bases from the buffered rows
                for buf in (m for m in opt.modifiers if isinstance(m, GradientRowBuffer)):
                    buf.build(bank_of(opt), "d0")
            if sharded:
                share = ids.chunk(WORLD)[rank]
                model(input_ids=share, labels=share).loss.backward()
            else:
                for half in ids.chunk(WORLD):
                    model(input_ids=half, labels=half).loss.backward()
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1 / WORLD)
            opt.step()
            opt.zero_grad()
        return ({n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                 for n, p in model.named_parameters() if p.requires_grad}, opt)

    want, whole_opt = train(build().to(DEVICE), False)
    model = build().to(DEVICE)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    got, opt = train(model, True)
    names, params = opt.routed_named_params()
    return {"routed": len(names), "sharded": type(params[0]).__name__,
            "bases": len(bank_of(opt).names()) if hasattr(bank_of(opt), "names") else None,
            "projected": opt.metrics().get("projection/projected_tensors"),
            "max_err": max(float((got[n] - want[n]).abs().max()) for n in want),
            "max_abs": max(float(want[n].abs().max()) for n in want)}


WORLD = 2


def main() -> None:
    out_path = sys.argv[1]
    global WORLD
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, WORLD = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(DEVICE, (WORLD,))
    cases = [(r, None, None, None) for r in ("vanilla", "shared", "decoupled", "v_only")]
    cases += [(r, side, st, None) for r in ("shared", "decoupled", "v_only")
              for side in ("in", "out", "both") for st in ("fixed", "overlap")]
    cases = [(*c, 32) for c in cases]
    cases += [("decoupled", None, None, 1, 32), ("decoupled", "both", "overlap", 1, 32)]
    # 8-bit states, blockwise over each rank's shard. 8: a and b only (512 elements a shard: the
    # blocks of the whole tensor); 80: every tensor, odd (64 + 48) and norm (32 + 32) too (one
    # block in one process, one per shard)
    cases += [(r, side, st, None, bits) for bits in (8, 80) for r in ("shared", "decoupled")
              for side, st in ((None, None), ("both", "overlap"))]
    results = []
    for routing, side, strength, nan_at, bits in cases:
        whole = Net().to(DEVICE)
        whole_opt = optimizer(whole, routing, side, strength, bits)
        train(whole, whole_opt, None, nan_at)
        sharded = Net().to(DEVICE)
        for module in (sharded.a, sharded.b, sharded.odd, sharded):
            fully_shard(module, mesh=mesh)
        opt = optimizer(sharded, routing, side, strength, bits)
        train(sharded, opt, rank, nan_at)
        got, want = weights(sharded), weights(whole)
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, json.dumps(strength_state(opt), default=str))
        results.append({
            "routing": routing, "side": side, "strength": strength, "nan_at": nan_at, "state_bits": bits,
            "err": {n: float((got[n] - want[n]).abs().max()) for n in got},
            "state_types": sorted({type(v).__name__ for st in opt.state.values() for v in st.values()}),
            "sharded": type(sharded.a.weight).__name__,
            "placements": str(sharded.odd.weight.placements),
            "max_err": max(float((got[n] - want[n]).abs().max()) for n in got),
            "max_abs": max(float(want[n].abs().max()) for n in want),
            "skipped": opt.skipped_steps, "global_step": opt.global_step,
            "whole_global_step": whole_opt.global_step,
            "strength_same_on_ranks": len(set(states)) == 1,
            "strength_same_as_whole": states[0] == json.dumps(strength_state(whole_opt), default=str),
            "final": {n: got[n].tolist() for n in ("a.weight",)},
        })
    peft_row = peft_ogp(mesh, rank)
    gathers = gathers_per_step(mesh, rank)
    edges = whole_many_edges(mesh)
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump({"cases": results, "peft_ogp": peft_row, "gathers_per_step": gathers,
                       "whole_many_edges_equal": edges}, fh)
    dist.barrier()
    dist.destroy_process_group()
    # A rank sometimes aborted in C++ teardown at interpreter exit ("terminate called without an
    # active exception", after every result was written; seen in CI): end without that teardown,
    # as fsdp2_resume_worker.py does, once the work is done and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
