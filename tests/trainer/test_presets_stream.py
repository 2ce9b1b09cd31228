"""Every method preset runs two short domains through a Trainer and does what it says."""

from __future__ import annotations

import pytest
from trainer_helpers import DOMAINS, lm_dataset, lora_model, run_domain, train_args
from transformers import Trainer

import lora_cl
from lora_cl.modifiers import AGEM, EWCPenalty, ImportanceRescale, Projection, ReplayMix

TWO = list(DOMAINS)[:2]
CASES = [(name, None) for name in lora_cl.PRESETS] + [("ewc", "decoupled"), ("replay", "decoupled")]


def _one(optimizer: lora_cl.RoutedAdamW, kind: type) -> object:
    (mod,) = [m for m in optimizer.modifiers if isinstance(m, kind)]
    return mod


@pytest.mark.parametrize(("method", "routing"), CASES, ids=[f"{m}-{r or 'default'}" for m, r in CASES])
def test_preset_runs_two_domains(tiny_factory, tmp_path, method, routing):
    model, tok = lora_model(tiny_factory)
    overrides = {"routing": routing} if routing else {}
    optimizer = lora_cl.make_optimizer(model, method, lr=1e-3, **overrides)
    spec = optimizer.lora_cl_method
    assert spec.name == method and optimizer.param_groups[0]["routing"] == (routing or spec.routing)
    callback = lora_cl.ContinualCallback(probe_every=1)
    counts = []
    for name in TWO:
        run_domain(model, tok, optimizer, callback, name, DOMAINS[name], tmp_path, max_steps=2)
        counts.append({k: v for k, v in optimizer.metrics().items()})
    assert callback.domains == TWO

    if spec.needs_bank:
        lora_a = {n for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad}
        # (a rank-32 basis of a <= 32-dim output space would block it wholesale: the tiny model's
        # v_proj, with 2 kv heads of 16, is left out)
        lora_b = {n for n, p in model.named_parameters() if "lora_B" in n and p.shape[0] > 32}
        assert lora_b
        bank = optimizer.bank
        assert bank.domains() == TWO
        assert set(bank.names("in")) == lora_a  # lora_A on its input side, always
        # both factors protected by default (lora_B on its output side); "-in" presets: lora_A only
        assert set(bank.names("out")) == (set() if spec.side == "in" else lora_b)
        assert counts[1]["projection/projected_tensors"] == len(lora_a) + len(bank.names("out"))
    else:
        assert optimizer.bank is None
    if method in ("gpm", "gpm-in"):
        proj = _one(optimizer, Projection)
        assert proj.strength.alpha == 1.0 and proj.weighted is False
        # activation bases for all four lora_A layers (+ gradient-row bases for lora_B of q_proj)
        assert callback.bases_added[TWO[0]] == 4 + (0 if method == "gpm-in" else len(lora_b))
    if method == "replay":
        mix = _one(optimizer, ReplayMix)
        assert counts[0]["replaymix/mixed_steps"] == 0  # first domain: nothing to replay
        assert counts[1]["replaymix/mixed_steps"] == 2 and mix.mixed_steps > 0
        assert len(callback.replay) == 2  # max(1, 0.5% of 8) per domain
    if method == "agem":
        assert _one(optimizer, AGEM).steps == 2
    if method == "ewc":
        assert _one(optimizer, ImportanceRescale).importance.total
    if method == "ewc-penalty":
        assert _one(optimizer, EWCPenalty).importance.anchors
    if method == "vanilla":
        assert optimizer.modifiers == [] and optimizer.param_groups[0]["routing"] == "vanilla"


def test_adapter_bases_and_same_trainer_reused(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp-fixed", lr=1e-3, basis="adapter", side="both",
                                       basis_rank=2)
    callback = lora_cl.ContinualCallback()
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2),
                      train_dataset=lm_dataset(tok, DOMAINS[TWO[0]]), optimizers=(optimizer, None))
    lora_cl.attach(trainer, callback)
    for name in TWO:
        trainer.train_dataset = lm_dataset(tok, DOMAINS[name])
        callback.set_domain(name)
        trainer.train()
    bank = optimizer.bank
    assert bank.domains() == TWO
    assert {n for n in bank.names("out")} == {n for n, _ in model.named_parameters() if "lora_B" in n}
    assert all(bank.get(TWO[0], n, "in")[0].shape[1] <= 2 for n in bank.names("in"))


def test_replay_source_mixes_from_the_first_domain(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "agem", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2),
                      train_dataset=lm_dataset(tok, DOMAINS["law"]), optimizers=(optimizer, None))
    lora_cl.attach(trainer, callback)
    callback.set_domain("law", replay_source=lm_dataset(tok, DOMAINS["astronomy"]))
    trainer.train()
    assert _one(optimizer, AGEM).steps == 2 and callback.last_replay_loss is not None


def test_no_bases_built_warns(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    # a rank-64 basis of a 64-dim input space would block everything: the buffer keeps no rows
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3, basis_rank=64)
    with pytest.warns(RuntimeWarning, match="built no gradient bases"):
        run_domain(model, tok, optimizer, lora_cl.ContinualCallback(), "law", DOMAINS["law"],
                   tmp_path, max_steps=1)
    assert optimizer.bank.domains() == []
