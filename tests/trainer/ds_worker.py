"""One process of the DeepSpeed tests: ``prep`` (bases + adapter of a first domain, then the
single-process reference of the second) or ``train`` (the second domain through the HF Trainer
with a DeepSpeed config, under ``torchrun``). Run by tests/trainer/test_deepspeed.py.

    python ds_worker.py prep OUT
    torchrun --nproc_per_node 2 ds_worker.py train OUT --prep PREP --config zero2.json [...]

Writes ``OUT/final.safetensors`` (LoRA tensors after training, rank 0) or ``OUT/error.txt``;
``--stream`` trains a third domain after the second, one Trainer (DeepSpeed engine) each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
import trainer_helpers as H  # noqa: E402

import lora_cl  # noqa: E402
from lora_cl.models import load_model  # noqa: E402
from lora_cl.subspace import SubspaceBank  # noqa: E402

torch.set_num_threads(1)
GLOBAL_BATCH = 4
FIRST, SECOND, THIRD = "cooking", "astronomy", "law"
LR = 1e-3


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (under ZeRO-3 gathered from every rank: call it on all ranks)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_numel") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def fresh(prep: Path | None, modules_to_save: list[str] | None = None) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model, tokenizer = H.lora_model(lambda: load_model("tiny"), modules_to_save=modules_to_save)
    if prep is not None:
        saved = load_file(str(prep / "adapter.safetensors"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    return model, tokenizer


def zero3_resident_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the frozen and the trainable parameters this ZeRO-3 rank holds between steps: its
    partition of each, or the whole tensor where DeepSpeed keeps it (``ds_persist``)."""
    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        held = p.ds_numel if p.ds_persist else p.ds_tensor.numel()
        out["trainable" if p.requires_grad else "frozen"] += held * p.ds_tensor.element_size()
    return out


class NaNAt(lora_cl.GradientModifier):
    """Test-only: g~ = NaN on the ``at``-th step it sees (a broken replay gradient, say)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def apply(self, batch):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls != self.at:
            return batch.grads
        return [torch.full_like(g, float("nan")) for g in batch.grads]


class NaNFactory(lora_cl.RoutedAdamWFactory):
    """The method's optimizer with :class:`NaNAt` last in its chain."""

    nan_at = 2

    def build(self, model: torch.nn.Module, **kwargs: object) -> lora_cl.RoutedAdamW:
        optimizer = super().build(model, **kwargs)
        optimizer.modifiers.append(NaNAt(self.nan_at))
        return optimizer


class SplitFactory(lora_cl.RoutedAdamWFactory):
    """Builds the method's optimizer with its LoRA tensors in two routed groups (refused by ZeRO)."""

    def build(self, model: torch.nn.Module, **kwargs: object) -> lora_cl.RoutedAdamW:
        whole = super().build(model, **kwargs)
        groups = []
        for g in whole.param_groups:
            half = len(g["params"]) // 2
            if g["routing"] == "vanilla" or half == 0:
                groups.append(g)
                continue
            for part in (slice(0, half), slice(half, None)):
                groups.append({**g, "params": g["params"][part], "param_names": g["param_names"][part]})
        split = lora_cl.RoutedAdamW(groups, lr=LR, modifiers=whole.modifiers)
        split.lora_cl_method, split.bank = whole.lora_cl_method, whole.bank
        self._built = (weakref.ref(model), split)
        return split


def second_domain(out: Path, prep: Path, *, steps: int, world: int, method: str = "ogp",
                  deepspeed: str | dict | None = None, save_steps: int = 0,
                  resume: str | None = None, state_bits: int = 32, split_groups: bool = False,
                  bf16: bool = False, domains: tuple[str, ...] = (SECOND,),
                  nan: bool = False, grad_accum: int = 1) -> lora_cl.ContinualCallback:
    # nan: the final norm trains too (a second, vanilla param group) and the routed group's g~ is
    # NaN at step 2, so that step must be skipped for both groups, as in one process
    model, tokenizer = fresh(prep, modules_to_save=["norm"] if nan else None)
    bank = SubspaceBank.load(prep / "bank.safetensors")
    # Under DeepSpeed the Trainer drops optimizers=(opt, None) and builds its own: hand a factory.
    factory = (NaNFactory if nan else SplitFactory if split_groups else lora_cl.RoutedAdamWFactory)(
        method, lr=LR, bank=bank if method == "ogp" else None, state_bits=state_bits,
        **({"min_8bit_size": 0} if state_bits == 8 else {}))  # the tiny LoRA tensors too
    callback = lora_cl.ContinualCallback()
    for k, domain in enumerate(domains):  # one Trainer (one DeepSpeed engine) per domain
        args = H.train_args(out if len(domains) == 1 else out / f"{k}-{domain}", max_steps=steps,
                            per_device_train_batch_size=GLOBAL_BATCH // (world * grad_accum),
                            gradient_accumulation_steps=grad_accum, deepspeed=deepspeed,
                            ddp_find_unused_parameters=False, bf16=bf16,
                            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                            save_only_model=False)
        trainer = H.Trainer(model=model, args=args,
                            train_dataset=H.lm_dataset(tokenizer, H.DOMAINS[domain]),
                            optimizer_cls_and_kwargs=factory.cls_and_kwargs())
        lora_cl.attach(trainer, callback)
        callback.set_domain(domain)
        trainer.train(resume_from_checkpoint=resume)
    rank = int(os.environ.get("RANK", "0"))
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):  # ZeRO-3: what this rank holds
        (out / f"rank{rank}_bytes.json").write_text(json.dumps(zero3_resident_bytes(model)))
    final = lora_tensors(model)  # every rank: a ZeRO-3 gather is collective
    if rank == 0:
        save_file(final, str(out / "final.safetensors"))
        info = {"global_step": factory.optimizer.global_step, "world": world}
        if any(hasattr(p, "ds_numel") for p in model.parameters()):  # ZeRO-3: which LoRA tensors it
            info["zero3_persistent"] = sum(bool(p.ds_persist) for p in model.parameters()  # kept whole
                                           if p.requires_grad)
        if nan:
            info["skipped_steps"] = factory.optimizer.skipped_steps
        (out / "info.json").write_text(json.dumps(info))
        # each domain's end-of-domain adapter snapshot, by size (ZeRO-3: gathered, not (0,)-shaped)
        (out / "snapshots.json").write_text(json.dumps({d: sum(t.numel() for t in snap.values())
                                                        for d, snap in callback.snapshots.items()}))
        if factory.optimizer.bank is not None:
            factory.optimizer.bank.save(out / "bank.safetensors")
    return callback


def prep(out: Path) -> None:
    """Domain 1 (bases + adapter), then the single-process reference runs of domain 2."""
    model, tokenizer = fresh(None)
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=LR)
    H.run_domain(model, tokenizer, optimizer, lora_cl.ContinualCallback(), FIRST, H.DOMAINS[FIRST],
                 out / "first", max_steps=3)
    optimizer.bank.save(out / "bank.safetensors")
    save_file(lora_tensors(model), str(out / "adapter.safetensors"))
    for steps in (2, 4):
        for method, suffix in (("ogp", ""), ("vanilla", "-vanilla")):  # vanilla: what routing must beat
            ref = out / f"reference{steps}{suffix}"
            ref.mkdir(parents=True, exist_ok=True)
            second_domain(ref, out, steps=steps, world=1, method=method)
    ref = out / "reference-nan"  # 4 steps, norm trained too, step 2 skipped for a NaN g~
    ref.mkdir(parents=True, exist_ok=True)
    second_domain(ref, out, steps=4, world=1, nan=True)
    for method, suffix in (("ogp", ""), ("vanilla", "-vanilla")):
        ref = out / f"reference-stream{suffix}"  # two more domains, one Trainer each, 3 steps each
        ref.mkdir(parents=True, exist_ok=True)
        second_domain(ref, out, steps=3, world=1, domains=(SECOND, THIRD), method=method)
    # 8-bit states (state_bits=8), for the ZeRO-2 8-bit runs: 4 steps, and the two-domain stream
    for ref, kw in ((out / "reference4-8bit", dict(steps=4)),
                    (out / "reference-stream-8bit", dict(steps=3, domains=(SECOND, THIRD))),
                    (out / "reference-stream-8bit-vanilla",
                     dict(steps=3, domains=(SECOND, THIRD), method="vanilla"))):
        ref.mkdir(parents=True, exist_ok=True)
        second_domain(ref, out, world=1, state_bits=8, **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("prep", "train"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--prep", type=Path)
    parser.add_argument("--config", help="a DeepSpeed JSON file, or JSON text")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume")
    parser.add_argument("--method", default="ogp")
    parser.add_argument("--state-bits", type=int, default=32)
    parser.add_argument("--split-groups", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--stream", action="store_true", help=f"train {SECOND} then {THIRD}")
    parser.add_argument("--nan", action="store_true", help="norm trained, NaN g~ at step 2")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.mode == "prep":
        prep(a.out)
        return
    config = json.loads(a.config) if a.config and a.config.lstrip().startswith("{") else a.config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        second_domain(a.out, a.prep, steps=a.steps, world=world, method=a.method, deepspeed=config,
                      save_steps=a.save_steps, resume=a.resume, state_bits=a.state_bits,
                      split_groups=a.split_groups, bf16=a.bf16,
                      domains=(SECOND, THIRD) if a.stream else (SECOND,), nan=a.nan,
                      grad_accum=a.grad_accum)
    except Exception as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            (a.out / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        sys.exit(3)
    if torch.distributed.is_initialized():  # no gloo thread left to the interpreter's exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
