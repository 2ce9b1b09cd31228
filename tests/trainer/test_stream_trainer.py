"""A 3-domain ogp stream through transformers.Trainer: bases, strength resets, logs, resume."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict
from trainer_helpers import DOMAINS, Recorder, lm_dataset, lora_model, run_domain, train_args
from transformers import Trainer, TrainerCallback

import lora_cl
from lora_cl.modifiers import OverlapAdaptiveStrength, Projection
from lora_cl.subspace import GradientRowBuffer


def _strength(optimizer: lora_cl.RoutedAdamW) -> OverlapAdaptiveStrength:
    (proj,) = [m for m in optimizer.modifiers if isinstance(m, Projection)]
    assert isinstance(proj.strength, OverlapAdaptiveStrength)
    return proj.strength


class StrengthProbe(TrainerCallback):
    """Reads the strength schedule at train begin/end (runs after ContinualCallback)."""

    def __init__(self, optimizer: lora_cl.RoutedAdamW) -> None:
        self.strength = _strength(optimizer)
        # ogp protects both factors: one buffer per side (lora_A inputs, lora_B outputs)
        self.buffers = [m for m in optimizer.modifiers if isinstance(m, GradientRowBuffer)]
        assert [b.side for b in self.buffers] == ["in", "out"]
        self.events: list[tuple[str, int, int, int]] = []

    def _record(self, event: str) -> None:
        rows = sum(int(b.metrics()["rows_buffered"]) for b in self.buffers)
        self.events.append((event, self.strength.steps, len(self.strength.sbar), rows))

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self._record("begin")

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._record("end")


class Crash(RuntimeError):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Crash(f"simulated crash after step {self.step}")


def test_ogp_stream_bases_resets_logs_and_lora_only_routing(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory, modules_to_save=["norm"])
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    routed, vanilla = optimizer.param_groups
    assert routed["routing"] == "decoupled" and vanilla["routing"] == "vanilla"
    assert all(lora_cl.is_lora_name(n) for n in routed["param_names"])
    assert vanilla["param_names"] and all("modules_to_save" in n for n in vanilla["param_names"])
    norm_before = [p.detach().clone() for p in vanilla["params"]]

    callback = lora_cl.ContinualCallback(probe_every=1)
    probe, reporter = StrengthProbe(optimizer), Recorder()
    lora_a = {n for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad}
    # lora_B gets an output-side basis where its fan-out (q: 64, v: 32) exceeds the rank cap 32
    lora_b = {n for n, p in model.named_parameters() if "lora_B" in n and p.shape[0] > 32}
    assert lora_b and all("q_proj" in n for n in lora_b)
    bank = optimizer.bank
    seen: dict[str, list[str]] = {}
    for name in DOMAINS:
        trainer = run_domain(model, tok, optimizer, callback, name, DOMAINS[name], tmp_path,
                             extra=[reporter, probe])
        seen[name] = bank.domains()
        # the recording callback was registered before ours; attach moved ours first
        assert trainer.callback_handler.callbacks[0] is callback
    assert seen == {"cooking": ["cooking"], "astronomy": ["cooking", "astronomy"],
                    "law": ["cooking", "astronomy", "law"]}
    assert set(bank.names("in")) == lora_a and set(bank.names("out")) == lora_b
    assert set(bank.names()) == lora_a | lora_b
    assert callback.domains == list(DOMAINS) and set(callback.snapshots) == set(DOMAINS)
    adapter = get_peft_model_state_dict(model)
    assert set(callback.snapshots["law"]) == set(adapter)
    assert all(torch.equal(v, adapter[k]) for k, v in callback.snapshots["law"].items())
    first = callback.snapshots["cooking"]
    assert any(not torch.equal(first[k], adapter[k]) for k in first if "lora_B" in k)

    # strength: no basis in domain 1 (no step), stepping in 2 and 3, reset at each domain start
    assert probe.events[0][:3] == ("begin", 0, 0) and probe.events[1][:2] == ("end", 0)
    for begin, end in [(probe.events[2], probe.events[3]), (probe.events[4], probe.events[5])]:
        assert begin[:4] == ("begin", 0, 0, 0)  # strength EMA and gradient-row buffer reset
        assert end[:3] == ("end", 3, 1)

    # alpha/overlap reached the reporting-style callback and the Trainer's log history
    train_logs = [lg for lg in reporter.logs if "loss" in lg]
    assert len(train_logs) == 9 and all("projection/alpha" in lg for lg in train_logs)
    later = train_logs[3:]
    assert all("projection/overlap" in lg and "probe/old_direction_lr" in lg for lg in later)
    assert all(0.0 <= lg["projection/alpha"] <= 0.5 for lg in later)
    assert [lg["cl/domain_index"] for lg in train_logs] == [0.0] * 3 + [1.0] * 3 + [2.0] * 3
    builds = [lg for lg in reporter.logs if "cl/basis_build_seconds" in lg]
    assert [lg["cl/bases_added"] for lg in builds] == [float(len(lora_a) + len(lora_b))] * 3
    assert "projection/overlap" in trainer.state.log_history[-3]

    # non-LoRA trainable tensors trained through the vanilla group
    assert any(not torch.equal(a, p) for a, p in zip(norm_before, vanilla["params"]))
    state = callback.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert set(state["basis_build_seconds"]) == set(DOMAINS)


def test_reporting_callback_misses_keys_unless_attached(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    reporter, callback = Recorder(), lora_cl.ContinualCallback()
    # the Trainer's own order: reporting integrations, then user callbacks
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2),
                      train_dataset=lm_dataset(tok, DOMAINS["law"]), optimizers=(optimizer, None),
                      callbacks=[reporter, callback])
    callback.set_domain("law")
    trainer.train()
    train_logs = [lg for lg in reporter.logs if "loss" in lg]
    assert train_logs and not any("projection/alpha" in lg for lg in train_logs)
    # the Trainer's history still gets them (the callback updates the entry it just logged)
    assert all("projection/alpha" in h for h in trainer.state.log_history if "loss" in h)


def test_mid_domain_resume_keeps_modifier_state(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    run_domain(model, tok, optimizer, callback, "cooking", DOMAINS["cooking"], tmp_path)

    out = tmp_path / "astronomy"
    ckpt = dict(save_strategy="steps", save_steps=2, max_steps=4)
    data = lm_dataset(tok, DOMAINS["astronomy"])
    crashing = Trainer(model=model, args=train_args(out, **ckpt), train_dataset=data,
                       optimizers=(optimizer, None), callbacks=[CrashAt(3)])
    lora_cl.attach(crashing, callback)
    callback.set_domain("astronomy")
    with pytest.raises(Crash):
        crashing.train()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert _strength(optimizer).steps == 3 and callback.domains == ["cooking"]

    probe = StrengthProbe(optimizer)
    resumed = Trainer(model=model, args=train_args(out, **ckpt), train_dataset=data,
                      optimizers=(optimizer, None), callbacks=[probe])
    lora_cl.attach(resumed, callback)
    callback.set_domain("astronomy")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    begin, end = probe.events
    # restored from checkpoint-2, not reset by start_domain: 2 strength steps, 2 steps of rows
    assert begin[:3] == ("begin", 2, 1) and begin[3] > 0
    assert end[:2] == ("end", 4)
    assert optimizer.bank.domains() == ["cooking", "astronomy"]
    assert callback.domains == ["cooking", "astronomy"]
