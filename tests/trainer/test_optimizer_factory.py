"""make_optimizer and the optimizer_cls_and_kwargs factory keep one RoutedAdamW for the stream."""

from __future__ import annotations

import pytest
from trainer_helpers import DOMAINS, lm_dataset, lora_model, train_args
from transformers import Trainer

import lora_cl
from lora_cl import MethodError
from lora_cl.trainer import bank_of, method_of, routed_optimizer


def test_make_optimizer_attaches_spec_and_bank(tiny_factory):
    model, _ = lora_model(tiny_factory, modules_to_save=["norm"])
    bank = lora_cl.SubspaceBank(mode="replace")
    opt = lora_cl.make_optimizer(model, "adam-nscl", lr=3e-4, weight_decay=0.01, bank=bank,
                                 alpha=0.25)
    assert opt.bank is bank and bank_of(opt) is bank
    assert method_of(opt).alpha == 0.25 and opt.lora_cl_method.routing == "shared"
    routed, vanilla = opt.param_groups
    assert routed["routing"] == "shared" and vanilla["routing"] == "vanilla"
    assert (routed["lr"], routed["weight_decay"]) == (3e-4, 0.01)
    assert not any(lora_cl.is_lora_name(n) for n in vanilla["param_names"])
    names, _ = opt.routed_named_params()
    assert names == routed["param_names"]
    assert routed_optimizer(opt) is opt
    with pytest.raises(MethodError, match="did you mean 'alpha'"):
        lora_cl.make_optimizer(model, "ogp", alpah=0.2)


def test_inferred_spec_for_a_hand_built_optimizer(tiny_factory):
    model, _ = lora_model(tiny_factory)
    bank = lora_cl.SubspaceBank()
    opt = lora_cl.RoutedAdamW(lora_cl.param_groups(model, routing="decoupled"),
                              modifiers=[lora_cl.GradientRowBuffer(), lora_cl.Projection(bank, 0.5),
                                         lora_cl.ReplayMix(0.5)])
    spec = method_of(opt)
    assert (spec.name, spec.basis, spec.replay, spec.routing) == ("custom", "gradient", "mix", "decoupled")
    assert bank_of(opt) is bank


def test_factory_gives_fresh_trainers_the_same_optimizer(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    factory = lora_cl.RoutedAdamWFactory("ogp", lr=1e-3, alpha_max=0.4)
    callback = lora_cl.ContinualCallback()
    seen = []
    for name in list(DOMAINS)[:2]:
        trainer = Trainer(model=model, args=train_args(tmp_path / name, max_steps=2),
                          train_dataset=lm_dataset(tok, DOMAINS[name]),
                          optimizer_cls_and_kwargs=factory.cls_and_kwargs())
        lora_cl.attach(trainer, callback)
        callback.set_domain(name)
        trainer.train()
        seen.append(routed_optimizer(trainer.optimizer))
    assert seen[0] is seen[1] is factory.optimizer
    assert factory.optimizer.lora_cl_method.alpha_max == 0.4
    assert factory.optimizer.param_groups[0]["lr"] == 1e-3
    assert factory.optimizer.bank.domains() == list(DOMAINS)[:2]
