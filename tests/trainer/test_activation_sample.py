"""activation_sample="last_steps": GPM bases from the domain's last training forwards (hooks), no
forward at the domain's end; with the weights held still it gives the end-of-domain bases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import lora_model, run_domain
from transformers import TrainerCallback, TrainerControl, TrainerState

import lora_cl
from lora_cl.trainer.checkpoints import CheckpointMarker

TEXTS = [f"Domain text number {i}: the quick brown fox {i} jumps over the lazy dog." for i in range(8)]


def _run(tiny_factory, tmp_path, mode: str) -> tuple[dict, int, int]:
    torch.manual_seed(0)  # the same LoRA init in both runs (lora_B's gradient rows depend on it)
    model, tokenizer = lora_model(tiny_factory)
    # lr 0: the weights stay, so the last steps' layer inputs are the ones the end's forwards see
    optimizer = lora_cl.make_optimizer(model, "gpm", lr=0.0, basis_examples=8, activation_sample=mode)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    callback = lora_cl.ContinualCallback()
    # 8 examples, batch 4, 2 steps: the window is the whole domain, every token kept (< 4096)
    run_domain(model, tokenizer, optimizer, callback, "d0", TEXTS, tmp_path / mode, max_steps=2)
    bank = optimizer.bank
    proj = {(n, side): bank.projector(n, side) for n in bank.names() for side in ("in", "out")}
    return ({k: p[0] @ p[0].T for k, p in proj.items() if p is not None},
            sum(forwards), len(forwards) - sum(forwards))


def test_last_steps_sample_gives_the_end_bases_without_a_forward(tiny_factory, tmp_path):
    end, end_train, end_extra = _run(tiny_factory, tmp_path, "end")
    last, last_train, last_extra = _run(tiny_factory, tmp_path, "last_steps")
    assert end_train == last_train == 2  # the two training forwards
    assert end_extra == 2 and last_extra == 0  # "end": 8 examples in 2 batches under no_grad
    assert end.keys() == last.keys() and any(k[1] == "in" for k in end)
    for key in end:  # the same subspaces (the rows' order differs: rounding)
        torch.testing.assert_close(last[key], end[key], rtol=0, atol=1e-4, msg=str(key))


def test_the_sampled_steps_are_the_last_ones_and_no_checkpoint_lands_in_them():
    spec = lora_cl.resolve_method("gpm", {"activation_sample": "last_steps", "basis_examples": 64})
    callback = lora_cl.ContinualCallback()
    args = SimpleNamespace(world_size=1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert callback._sample_window(spec, args, SimpleNamespace(max_steps=80)) == 72  # 8 steps x 8
    assert callback._sample_window(spec, args, SimpleNamespace(max_steps=5)) == 0  # the whole domain
    with pytest.raises(RuntimeError, match=r"differ across the 2 ranks.*activation_sample='end'"):
        callback._sample_window(spec, SimpleNamespace(**{**vars(args), "world_size": 2}),
                                SimpleNamespace(max_steps=80))
    callback.sample_from = 72
    marker = CheckpointMarker(callback, "d0")
    for step, saves in ((72, True), (73, False)):
        control = TrainerControl(should_save=True)
        marker.on_step_end(None, TrainerState(global_step=step, max_steps=80), control)
        assert control.should_save is saves, step


def test_activation_sample_needs_activation_bases():
    with pytest.raises(lora_cl.MethodError, match=r"activation_sample='last_steps' .* basis='activation'"):
        lora_cl.resolve_method("ogp", {"activation_sample": "last_steps"})
    with pytest.raises(lora_cl.MethodError, match=r"activation_sample must be one of"):
        lora_cl.resolve_method("gpm", {"activation_sample": "train"})


def test_a_checkpointed_layer_recomputed_in_backward_is_not_sampled_twice(tiny_factory):
    """With gradient checkpointing each decoder layer runs its forward again during backward; the
    hooks are armed only inside a model forward, so each token is offered once."""
    from lora_cl.subspace import ActivationSample

    torch.manual_seed(0)
    model, _ = lora_model(tiny_factory)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    offered: dict[str, int] = {}
    sample = ActivationSample(model, max_tokens=10_000).attach()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # 3 padding tokens: 13 real tokens
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    sample.detach()
    for name, s in sample.samples.items():
        if sample.owners[name] == name:
            offered[name] = int(s.rows.shape[0])
    assert offered and set(offered.values()) == {13}, offered
    assert sample.forwards == 1


def test_replay_forwards_are_not_sampled_for_the_domains_bases(tiny_factory, tmp_path):
    """gpm with last_steps sampling and replay: the replay batch (earlier domains' examples) runs a
    training-mode forward before every step of the second domain; only the domain's own training
    forwards may enter its activation sample (the replay ones used to, doubling it)."""
    torch.manual_seed(0)
    model, tokenizer = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "gpm", lr=1e-3, basis_examples=8,
                                       activation_sample="last_steps", replay="mix", replay_fraction=1.0)
    callback = lora_cl.ContinualCallback()
    seen = []

    class Probe(TrainerCallback):  # after the ContinualCallback (attach puts it first)
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            seen.append((len(callback.replay), callback._sample.forwards if callback._sample else 0))

    for name in ("d0", "d1"):  # 8 examples, batch 4, 2 steps: the window is the whole domain
        run_domain(model, tokenizer, optimizer, callback, name, TEXTS, tmp_path, max_steps=2, extra=[Probe()])
    assert seen[2:] == [(8, 1), (8, 2)], seen  # d1 replays the 8 kept examples; 2 sampled forwards
