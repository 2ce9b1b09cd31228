"""In a Trainer, RoutedAdamW's non-finite guard reads the norm gradient clipping already took.

The Trainer takes the total gradient norm before every optimizer step; ``lora_cl.attach`` hands
it to ``RoutedAdamW.supply_grad_norm``, so the guard reads no gradient a second time. A probe
callback counts the norm ops between ``on_pre_optimizer_step`` and ``on_optimizer_step``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import DOMAINS, lm_dataset, lora_model, train_args
from transformers import Trainer, TrainerCallback

import lora_cl

NORMS = {torch.ops.aten._foreach_norm.Scalar, torch.ops.aten.linalg_vector_norm.default}


class CountNorms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in NORMS:
            self.norms += 1
        return func(*args, **(kwargs or {}))


class StepProbe(TrainerCallback):
    """Norm ops inside each optimizer step (ContinualCallback, attached first, runs before)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._mode: CountNorms | None = None

    def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self._mode = CountNorms()
        self._mode.__enter__()

    def on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(None, None, None)
        self.per_step.append(self._mode.norms)


def _train(tiny_factory: Any, out: Any, *, attach: bool, method: str = "vanilla",
           nan_at: int | None = None, **args: Any) -> tuple[StepProbe, lora_cl.RoutedAdamW, list]:
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, method, lr=1e-3)
    probe = StepProbe()
    trainer = Trainer(model=model, args=train_args(out, **args), optimizers=(optimizer, None),
                      train_dataset=lm_dataset(tok, DOMAINS["cooking"]),
                      callbacks=[probe])
    callback = lora_cl.ContinualCallback()
    if attach:
        lora_cl.attach(trainer, callback)
    else:
        trainer.add_callback(callback)
    callback.set_domain("cooking")
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    snapshots: list[list[torch.Tensor]] = []
    calls = {"n": 0}

    def poison(module: Any, inputs: Any, output: Any) -> Any:
        calls["n"] += 1
        snapshots.append([p.detach().clone() for p in stepped])
        return output * float("nan") if calls["n"] == nan_at else output

    handle = model.get_output_embeddings().register_forward_hook(poison)
    try:
        trainer.train()
    finally:
        handle.remove()
    snapshots.append([p.detach().clone() for p in stepped])
    return probe, optimizer, snapshots


def stepped_any(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # clipping, or the Trainer's norm alone
def test_attached_guard_reads_no_gradient(tiny_factory, tmp_path, max_grad_norm):
    fed, _, _ = _train(tiny_factory, tmp_path / "fed", attach=True, max_grad_norm=max_grad_norm)
    assert fed.per_step == [0, 0, 0]
    # the same run without attach: the guard reads every gradient itself
    unfed, _, _ = _train(tiny_factory, tmp_path / "unfed", attach=False, max_grad_norm=max_grad_norm)
    assert len(unfed.per_step) == 3 and all(n > 0 for n in unfed.per_step), unfed.per_step


def test_attached_guard_still_skips_a_nonfinite_step(tiny_factory, tmp_path):
    # (the warning comes at the Trainer's next log, when metrics() reads the counter)
    with pytest.warns(RuntimeWarning, match="8 gradient\\(s\\) under the supplied norm"):
        probe, optimizer, snaps = _train(tiny_factory, tmp_path, attach=True, nan_at=2)
    assert probe.per_step == [0, 0, 0]
    assert optimizer.skipped_steps == 1
    assert optimizer.global_step == 2
    # the second forward's step was skipped: the weights after it are the weights before it
    assert len(snaps) == 4 and stepped_any(snaps[0], snaps[1]) and stepped_any(snaps[2], snaps[3])
    assert not stepped_any(snaps[1], snaps[2])
