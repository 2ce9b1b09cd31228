"""ContinualCallback refuses what cannot work, with messages that say what to do."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from helpers import TORCHRUN2, torchrun_env
from torch.utils.data import IterableDataset
from trainer_helpers import DOMAINS, lm_dataset, lora_model, run_domain, train_args
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import lora_cl
from lora_cl import ReplayDataError
from lora_cl.modifiers import ReplayMix

REPO = Path(__file__).resolve().parents[2]


class Stream(IterableDataset):
    """A streaming (not indexable) view of a map-style dataset."""

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        while True:
            yield from (self.rows[i] for i in range(len(self.rows)))


def _trainer(model: Any, data: Any, optimizer: Any, out: Any, **args: Any) -> Trainer:
    return Trainer(model=model, args=train_args(out, max_steps=2, **args), train_dataset=data,
                   optimizers=(optimizer, None))


def _streaming(tiny_factory: Any, method: str, out: Any) -> tuple[Any, ...]:
    """A LoRA model whose Trainer streams the law domain (not indexable), attached, domain set."""
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, method, lr=1e-3)
    rows = lm_dataset(tok, DOMAINS["law"])
    trainer = _trainer(model, Stream(rows), optimizer, out)
    callback = lora_cl.attach(trainer, lora_cl.ContinualCallback())
    callback.set_domain("law")
    return model, tok, optimizer, callback, rows, trainer


def test_plain_adamw_is_refused(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = _trainer(model, lm_dataset(tok, DOMAINS["law"]), adamw, tmp_path)
    callback = lora_cl.attach(trainer, lora_cl.ContinualCallback())
    callback.set_domain("law")
    with pytest.raises(TypeError, match=r"steps torch\.optim\.adamw\.AdamW.*optimizers=\(optimizer, None\)"):
        trainer.train()


def test_stream_mistakes(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    trainer = _trainer(model, lm_dataset(tok, DOMAINS["law"]), optimizer, tmp_path)
    lora_cl.attach(trainer, callback)
    with pytest.raises(RuntimeError, match=r"call callback\.set_domain\(name\) before"):
        trainer.train()
    callback.set_domain("law")
    trainer.train()
    with pytest.raises(ValueError, match="already finished"):
        callback.set_domain("law")
    other = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    second = _trainer(model, lm_dataset(tok, DOMAINS["cooking"]), other, tmp_path)
    lora_cl.attach(second, callback)
    callback.set_domain("cooking")
    with pytest.raises(RuntimeError, match="needs one optimizer"):
        second.train()


def test_replay_without_keepable_data_is_an_error(tiny_factory, tmp_path):
    model, tok, optimizer, callback, rows, trainer = _streaming(tiny_factory, "replay", tmp_path)
    with pytest.raises(ReplayDataError, match=r"replays examples of earlier domains.*train_dataset="):
        trainer.train()
    text_rows = Dataset.from_dict({"text": DOMAINS["law"]})
    callback.set_domain("law", train_dataset=text_rows)
    with pytest.raises(ReplayDataError, match="without 'labels'"):
        trainer.train()
    # a streaming Trainer is fine once the domain's examples are given
    callback.set_domain("law", train_dataset=rows)
    trainer.train()
    run_domain(model, tok, optimizer, callback, "cooking", DOMAINS["cooking"], tmp_path, max_steps=2)
    (mix,) = [m for m in optimizer.modifiers if isinstance(m, ReplayMix)]
    assert mix.mixed_steps == 2 and callback.replay.entries[0][0] == "law"


def test_reentrant_checkpointing_is_refused_not_silently_unmixed(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "replay", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    reentrant = dict(max_steps=1, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": True})
    run_domain(model, tok, optimizer, callback, "law", DOMAINS["law"], tmp_path, **reentrant)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        run_domain(model, tok, optimizer, callback, "cooking", DOMAINS["cooking"], tmp_path,
                   **reentrant)


def test_what_does_not_run_under_the_trainers_fsdp_is_refused(tmp_path):
    """On 2 CPU ranks: FSDP2 asked of a plain Trainer, which trains it unsharded as DDP on a CPU
    (../shared/STACK.md), is refused naming fsdp2_trainer; a replay method under a real FSDP2
    Trainer trains (tests/trainer/test_sharded_methods.py checks it against one process)."""
    out = tmp_path / "result.json"
    proc = subprocess.run([*TORCHRUN2, str(Path(__file__).with_name("fsdp_trainer_worker.py")), str(out)],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=torchrun_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    plain, replay = result["fsdp2_plain_trainer"], result["fsdp2_replay"]
    assert plain["world_size"] == 2 and plain["is_fsdp_enabled"] is False  # the silent drop
    assert re.search(r"did not shard the model \(on a CPU accelerate trains fsdp=... as plain DDP\); "
                     r"build the Trainer class with lora_cl.trainer.fsdp.fsdp2_trainer\(Trainer\)",
                     plain["error"] or ""), plain
    assert replay["is_fsdp_enabled"] is True and replay["error"] is None, replay


def test_fsdp1_is_refused(tiny_factory):
    """FSDP1 flattens the LoRA tensors (transformers 5 defaults to FSDP2; accelerate builds no
    FSDP1 plugin on a CPU, so the check runs here on the arguments alone)."""
    model, _ = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp")
    callback = lora_cl.ContinualCallback()
    callback.set_domain("law")
    args = TrainingArguments(output_dir="unused", use_cpu=True, fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(RuntimeError, match=r"runs under FSDP2 only .*fsdp_version=1: FSDP1 flattens "
                                           r".* training.fsdp: true"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=optimizer)


def test_gpm_needs_a_sample_of_a_streaming_domain(tiny_factory, tmp_path):
    _, _, optimizer, callback, rows, trainer = _streaming(tiny_factory, "gpm", tmp_path)
    with pytest.raises(ReplayDataError, match=r"basis_batches=\[\.\.\.\]"):
        trainer.train()
    batch = {k: torch.tensor(rows[:4][k]) for k in ("input_ids", "attention_mask")}
    callback.set_domain("law", basis_batches=[batch])
    trainer.train()
    # 4 lora_A + 2 q_proj lora_B (v_proj's fan-out 32 is not above the rank cap)
    assert optimizer.bank.domains() == ["law"] and callback.bases_added["law"] == 6


def test_unattached_callback_warns_when_reporting(tiny_factory):
    model, _ = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp")
    callback = lora_cl.ContinualCallback()
    callback.set_domain("law")
    args = TrainingArguments(output_dir="unused", report_to=["tensorboard"], use_cpu=True)
    with pytest.warns(UserWarning, match=r"lora_cl\.attach\(trainer, callback\)"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=optimizer)
    assert callback.started and optimizer.modifiers[0].metrics()["rows_buffered"] == 0


def test_set_domain_checks_its_inputs():
    callback = lora_cl.ContinualCallback()
    with pytest.raises(ValueError, match="non-empty str"):
        callback.set_domain("")
    with pytest.raises(ReplayDataError, match="must support len"):
        callback.set_domain("law", train_dataset=iter([1, 2]))
    with pytest.raises(ValueError, match="probe_every"):
        lora_cl.ContinualCallback(probe_every=-1)
