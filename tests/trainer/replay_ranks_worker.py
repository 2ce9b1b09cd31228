"""One rank of the replay-share check (tests/trainer/test_replay_buffer.py), under ``torchrun``:
the ranks replay their :func:`replay_share` of one draw of ``K`` examples and rank 0 writes the
averaged replay gradients beside one process's gradient of the whole draw (computed on rank 0
after the collective part, with plain autograd).

    torchrun --nproc_per_node 3 replay_ranks_worker.py OUT K
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
import trainer_helpers as H  # noqa: E402

import lora_cl  # noqa: E402
from lora_cl.models import load_model  # noqa: E402
from lora_cl.trainer.replay import replay_gradients, replay_share  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    out, k = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tok = H.lora_model(lambda: load_model("tiny"))
    torch.manual_seed(0)  # the same LoRA weights on every rank, lora_B not zero
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0.0, 0.05)
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    rows = H.lm_dataset(tok, H.DOMAINS["law"])
    # examples of different lengths, so counting one twice changes the token-weighted mean
    draw = [{key: rows[i][key] for key in ("input_ids", "attention_mask")} for i in range(k)]
    optimizer = lora_cl.make_optimizer(model, "replay")
    names, params = optimizer.routed_named_params()
    share, counted = replay_share(draw, world, rank)
    loss, grads = replay_gradients(model, collate(share), names, params, counted=counted)
    if rank == 0:
        whole = model(**collate(draw)).loss
        ref = torch.autograd.grad(whole, params)
        save_file({**{f"ranks.{n}": grads[n].contiguous() for n in names},
                   **{f"one.{n}": g.contiguous() for n, g in zip(names, ref, strict=True)},
                   "ranks.loss": torch.tensor([loss]), "one.loss": whole.detach().reshape(1)},
                  str(out / "grads.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
