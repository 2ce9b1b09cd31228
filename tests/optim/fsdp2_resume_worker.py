"""Worker for test_fsdp2.py's resume test: FSDP2 + RoutedAdamW (decoupled, overlap-adaptive
projection on both sides), 2 gloo ranks under torchrun.

``full OUT``: 6 steps, the final whole weights to OUT (rank 0). ``kill CKPT``: 3 steps, a
``torch.distributed.checkpoint`` save through ``lora_cl.optim.dtensor.sharded_state_dict`` into
CKPT (written to a temporary directory, renamed when every rank is done), then rank 1 kills
itself with SIGKILL. ``resume CKPT OUT``: a fresh model and optimizer, loaded from CKPT, steps
3-5, the final whole weights to OUT. ``FSDP2_STATE_BITS=80``: 8-bit states (every tensor).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsdp2_worker import BATCH, Net, batches, optimizer
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lora_cl.optim.dtensor import load_sharded_state_dict, sharded_state_dict

#: 32, or 80: 8-bit states for every tensor (blockwise over each rank's shard; fsdp2_worker.optimizer)
STATE_BITS = int(os.environ.get("FSDP2_STATE_BITS", "32"))


def make(mesh):  # noqa: ANN001, ANN201
    model = Net()
    for module in (model.a, model.b, model.odd, model):
        fully_shard(module, mesh=mesh)
    return model, optimizer(model, "decoupled", "both", "overlap", STATE_BITS)


def steps(model, opt, ts, rank: int) -> None:  # noqa: ANN001
    xs = batches()
    for t in ts:
        model(xs[t % len(xs)][rank * BATCH // 2:(rank + 1) * BATCH // 2]).backward()
        opt.step()
        opt.zero_grad()


def write_final(model, out: str, rank: int) -> None:  # noqa: ANN001
    whole = {n: p.full_tensor().detach().contiguous() for n, p in model.named_parameters()}
    if rank == 0:
        save_file(whole, out)


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, opt = make(mesh)
    if mode == "full":
        steps(model, opt, range(6), rank)
        write_final(model, sys.argv[2], rank)
    elif mode == "kill":
        steps(model, opt, range(3), rank)
        ckpt = Path(sys.argv[2])
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        dcp.save(sharded_state_dict(model, opt), checkpoint_id=str(tmp))
        dist.barrier()
        if rank == 0:
            os.replace(tmp, ckpt)  # complete on every rank: only now is it the checkpoint
        dist.barrier()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)  # rank 0: until torchrun, seeing rank 1 die, stops it
    elif mode == "resume":
        state = sharded_state_dict(model, opt)
        dcp.load(state, checkpoint_id=sys.argv[2])
        load_sharded_state_dict(model, opt, state)
        assert opt.global_step == 3, opt.global_step
        steps(model, opt, range(3, 6), rank)
        write_final(model, sys.argv[3], rank)
    dist.barrier()
    dist.destroy_process_group()
    # After a dcp.load, a rank sometimes aborted in C++ teardown at interpreter exit ("terminate
    # called without an active exception", 2 of ~10 runs, after every result was written): end
    # the process without that teardown, as the work is done and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
