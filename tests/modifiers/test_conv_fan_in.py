"""Conv LoRA: the fan-in of an (r, c, kh, kw) lora_A is c*kh*kw, not the kernel width; GPT-2's
Conv1D gets ordinary Linear LoRA factors. Both are protected by gradient-row bases."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_cl import make_optimizer
from lora_cl.modifiers.base import as_matrix, fan_in


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 16, kernel_size=3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def _train(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) if y is not None else model(**x).loss
        loss.backward()
        optimizer.step()


def _hard_projection_removes_old_directions(model, optimizer, make_batch):
    """Domain 1 builds bases; in domain 2 every projected g~ has no component in them."""
    bank = optimizer.bank
    optimizer.start_domain("d1")
    _train(model, optimizer, [make_batch(i) for i in range(4)])
    optimizer.end_domain("d1")
    buffers = [m for m in optimizer.modifiers if type(m).__name__ == "GradientRowBuffer"]
    assert sum(b.build(bank, "d1") for b in buffers) > 0
    optimizer.start_domain("d2")
    names, params = optimizer.routed_named_params()
    seen = {}
    for name, p in zip(names, params, strict=True):
        proj = bank.projector(name, "in")
        if proj is not None:
            assert proj[0].shape[0] == fan_in(p)  # c*kh*kw for a conv lora_A
            seen[name] = proj[0]
    assert seen
    projection = next(m for m in optimizer.modifiers if type(m).__name__ == "Projection")
    from lora_cl.modifiers.base import GradBatch

    model.zero_grad()
    x, y = make_batch(9)
    (nn.functional.cross_entropy(model(x), y) if y is not None else model(**x).loss).backward()
    grads = [p.grad.float() for p in params]
    out = projection.apply(GradBatch(names=names, params=params, grads=grads, raw=grads, step=1))
    for name, g, gt in zip(names, grads, out, strict=True):
        if name in seen:
            U = seen[name]
            assert (as_matrix(g) @ U).norm() > 1e-6  # there was something to remove
            torch.testing.assert_close(as_matrix(gt) @ U, torch.zeros(g.shape[0], U.shape[1]),
                                       atol=1e-6, rtol=0)
    return seen


def test_conv2d_lora_a_fan_in_is_channels_times_kernel():
    torch.manual_seed(0)
    model = get_peft_model(ConvNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert a.shape == (4, 6, 3, 3) and fan_in(a) == 54 and as_matrix(a).shape == (4, 54)
    optimizer = make_optimizer(model, "ogp-hard-reproject", lr=1e-3, side="in", basis_rank=8)

    def batch(i):
        gen = torch.Generator().manual_seed(i)
        return torch.randn(8, 6, 5, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)

    seen = _hard_projection_removes_old_directions(model, optimizer, batch)
    assert any(U.shape[0] == 54 for U in seen.values())


def test_gpt2_conv1d_lora_is_projected_on_its_input_side():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    model = get_peft_model(transformers.GPT2LMHeadModel(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert a.shape == (4, 64)  # peft builds Linear factors around the Conv1D (fan_in_fan_out)
    optimizer = make_optimizer(model, "ogp-hard-reproject", lr=1e-3, side="in", basis_rank=8)

    def batch(i):
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}, None

    seen = _hard_projection_removes_old_directions(model, optimizer, batch)
    assert all(U.shape[0] == 64 for U in seen.values())
