"""RoutedAdamW(state_bits=8): 8-bit blockwise m and v, same update, same routing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import torch_round_trip

import lora_cl
from lora_cl import GradientModifier, RoutedAdamW
from lora_cl.modifiers.base import GradBatch
from lora_cl.optim import quantized_state as q8

bnb = pytest.importorskip("bitsandbytes")

# LoRA-like shapes: A (r x d_in), B (d_out x r), a tail block (17000 = 66*256 + 104), the
# 8-bit threshold exactly (4096), and one tensor small enough to keep fp32 states.
SHAPES = [(16, 4096), (4096, 16), (1000, 17), (64, 64), (16,)]
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_params(dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=gen) * 0.1).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, t):
    gen = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)


class Zero(GradientModifier):
    """g~ = 0: the modified gradient carries nothing."""

    def apply(self, batch: GradBatch):
        return [torch.zeros_like(g) for g in batch.grads]


def test_layout_is_bitsandbytes_blockwise_and_small_tensors_stay_fp32():
    params = make_params()
    opt = RoutedAdamW(params, state_bits=8)
    set_grads(params, 0)
    opt.step()
    for p in params:
        state = opt.state[p]
        if p.numel() < q8.MIN_8BIT_SIZE:
            assert state["exp_avg"].dtype == torch.float32 and "state1" not in state
            continue
        blocks = math.ceil(p.numel() / 256)
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        assert state["state1"].shape == state["state2"].shape == p.shape
        assert state["absmax1"].shape == state["absmax2"].shape == (blocks,)
        assert "exp_avg" not in state


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_one_step_from_the_same_moments_equals_fp32_step(impl):
    """bitsandbytes-style: resync the fp32 run to the 8-bit run every step, then compare.

    The parameter update runs on the dequantized fp32 moments, so it is bit-identical to the
    fp32 path; the only error is requantizing the new moments (checked against fp32 here).
    """
    p32, p8 = make_params(), make_params()
    o32 = RoutedAdamW(p32, impl=impl, **HYPER)
    o8 = RoutedAdamW(p8, impl=impl, state_bits=8, **HYPER)
    for t in range(50 if impl == "fused" else 20):
        set_grads(p32, t)
        set_grads(p8, t)
        o32.step()
        o8.step()
        for a, b in zip(p32, p8, strict=True):
            assert torch.equal(a, b)
            (m32, v32), (m8, v8) = o32.moments(a), o8.moments(b)
            # state tolerances as bitsandbytes' 8-bit blockwise test: atol 3e-3, rtol 1e-3
            torch.testing.assert_close(m8, m32, atol=3e-3, rtol=1e-3)
            torch.testing.assert_close(v8, v32, atol=3e-3, rtol=1e-3)
            # and relative to the state's size: mean error under 2% (m) / 1% (v)
            assert (m8 - m32).abs().mean() <= 0.02 * m32.abs().mean()
            assert (v8 - v32).abs().mean() <= 0.01 * v32.abs().mean()
            m32.copy_(m8)
            v32.copy_(v8)


def test_trajectory_stays_close_to_fp32_over_100_steps():
    p32, p8 = make_params(), make_params()
    p0 = [p.detach().clone() for p in p32]
    o32 = RoutedAdamW(p32, **HYPER)
    o8 = RoutedAdamW(p8, state_bits=8, **HYPER)
    for t in range(100):
        set_grads(p32, t)
        set_grads(p8, t)
        o32.step()
        o8.step()
    for a, b, start in zip(p32, p8, p0, strict=True):
        drift = (b - a).norm() / (a - start).norm()
        # measured ~0.022 for every 8-bit shape (bitsandbytes AdamW8bit drifts the same)
        assert drift < 0.05, drift
        if a.numel() < q8.MIN_8BIT_SIZE:
            assert torch.equal(a, b)  # fp32 states: the fp32 path exactly


def test_no_modifier_matches_bitsandbytes_adamw8bit():
    shapes = [s for s in SHAPES if s != (4096, 16)]  # (16, 4096) covers the size; keeps it fast
    ours, theirs = make_params(shapes=shapes), make_params(shapes=shapes)
    p0 = [p.detach().clone() for p in ours]
    opt = RoutedAdamW(ours, state_bits=8, **HYPER)
    ref = bnb.optim.AdamW8bit(theirs, **HYPER)  # blockwise, min_8bit_size=4096 by default
    for t in range(100):
        set_grads(ours, t)
        set_grads(theirs, t)
        opt.step()
        ref.step()
    for a, b, start in zip(ours, theirs, p0, strict=True):
        # same quantization; the float order of m's update differs (lerp vs mul+add), which
        # can flip single codes: measured max |diff| 4e-4 vs updates of 4e-2.
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
        assert (a - b).norm() <= 5e-3 * (b - start).norm()
    for a, b in zip(ours, theirs, strict=True):
        if "state1" in opt.state[a]:
            codes_equal = (opt.state[a]["state2"] == ref.state[b]["state2"]).float().mean()
            assert codes_equal > 0.99


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_decoupled_zeroed_gradient_leaves_m_zero_while_v_grows(impl):
    params = make_params(shapes=[(16, 4096)])
    opt = RoutedAdamW(params, lr=1e-2, routing="decoupled", modifiers=[Zero()], state_bits=8,
                      impl=impl)
    v_means = []
    for t in range(5):
        set_grads(params, t)
        opt.step()
        m, v = opt.moments(params[0])
        if impl == "reference":
            assert torch.equal(m, torch.zeros_like(m))
            assert torch.equal(opt.state[params[0]]["absmax1"], torch.zeros(256))
        else:  # the fused path's first-moment pre-correction cancels g up to float rounding
            assert m.abs().max() < 1e-9
        v_means.append(v.mean().item())
    assert v_means[0] > 0 and all(b > a for a, b in zip(v_means, v_means[1:]))
    # v holds the raw g^2 scale: after t steps v ~ (1 - b2^t) E[g^2] = (1 - b2^t) 1e-4
    assert v_means[-1] == pytest.approx((1 - 0.999**5) * 1e-4, rel=0.05)


_round_trip = torch_round_trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_gives_an_identical_next_step(dtype):
    first = make_params(dtype)
    opt = RoutedAdamW(first, state_bits=8, **HYPER)
    for t in range(4):
        set_grads(first, t)
        opt.step()
    saved = _round_trip(opt.state_dict())
    assert saved["lora_cl"]["state_bits"] == 8
    assert any(s["state1"].dtype == torch.uint8 for s in saved["state"].values() if "state1" in s)

    second = [p.detach().clone().requires_grad_() for p in first]
    fresh = RoutedAdamW(second, state_bits=8, **HYPER)
    fresh.load_state_dict(saved)
    for p in second:
        if "absmax1" in fresh.state[p]:  # not cast to the bf16 param dtype by torch's loader
            assert fresh.state[p]["absmax1"].dtype == torch.float32
            assert fresh.state[p]["state1"].dtype == torch.uint8
    set_grads(first, 4)
    set_grads(second, 4)
    opt.step()
    fresh.step()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, fresh.state[b][key]), key


@pytest.mark.parametrize("saved_bits,load_bits", [(8, 32), (32, 8)])
def test_state_bits_mismatch_on_load_is_refused(saved_bits, load_bits):
    params = make_params()
    opt = RoutedAdamW(params, state_bits=saved_bits)
    set_grads(params, 0)
    opt.step()
    saved = _round_trip(opt.state_dict())
    other = RoutedAdamW(make_params(), state_bits=load_bits)
    with pytest.raises(ValueError, match=f"state_bits={saved_bits}.*built with state_bits={load_bits}"):
        other.load_state_dict(saved)
    assert not other.state  # nothing half-loaded
    # a checkpoint without lora-cl's metadata is judged by its tensors
    del saved["lora_cl"]
    with pytest.raises(ValueError, match="holds (8-bit|fp32) states for a tensor of"):
        other.load_state_dict(saved)


def test_state_bytes_per_param_on_7b_lora_like_tensors():
    """r=16 LoRA on 4 projections of hidden 4096 (A: 16x4096, B: 4096x16), 2 layers."""
    params = [torch.zeros(s, requires_grad=True) for _ in range(2 * 4) for s in [(16, 4096), (4096, 16)]]
    opt = RoutedAdamW(params, state_bits=8)
    set_grads(params, 0)
    opt.step()
    per_param = q8.state_nbytes(opt.state.values()) / sum(p.numel() for p in params)
    assert per_param <= 2.1, per_param  # 2 B codes + 2 x 4 B absmax per 256 + the step counter
    fp32 = RoutedAdamW(params)
    fp32.step()
    assert q8.state_nbytes(fp32.state.values()) / sum(p.numel() for p in params) >= 8


def test_trainer_curve_with_8bit_states_is_within_noise_of_fp32(tiny_factory, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    texts = ["Whisk the eggs with sugar until the mixture turns pale.",
             "Simmer the tomato sauce gently for ten minutes.",
             "Knead the dough and leave it to rise in a warm place.",
             "Season the soup with salt and black pepper."] * 2

    class Losses(TrainerCallback):
        def __init__(self):
            self.values = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(logs["loss"])

    def curve(state_bits):
        model, tok = tiny_factory()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        opt = lora_cl.make_optimizer(model, "ogp", lr=1e-2, state_bits=state_bits)
        opt.min_8bit_size = 256  # the tiny model's LoRA tensors (16x64, 64x16, 32x16) go 8-bit too
        enc = tok(texts, padding="max_length", truncation=True, max_length=16)
        labels = [[t if m else -100 for t, m in zip(ids, mask)]
                  for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        data = Dataset.from_dict({**enc, "labels": labels})
        losses = Losses()
        args = TrainingArguments(output_dir=str(tmp_path / str(state_bits)), use_cpu=True,
                                 report_to=[], save_strategy="no", max_steps=6,
                                 per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
                                 seed=0, lr_scheduler_type="constant")
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                callbacks=[losses]).train()
        if state_bits == 8:
            assert all(q8.is_8bit(s) for s in opt.state.values())
        return losses.values

    full, eight = curve(32), curve(8)
    assert len(full) == len(eight) == 6
    drop = full[0] - full[-1]
    assert drop > 0.15 and eight[0] - eight[-1] > 0.15  # both learn (measured ~0.25)
    for a, b in zip(full, eight, strict=True):  # measured |b - a| <= 0.02
        assert abs(b - a) <= 0.25 * drop


def test_chunked_dequantize_and_requantize_equal_per_tensor_bitwise():
    """Chunk8bit (one bitsandbytes call per moment for many tensors) == per-tensor calls, tail blocks too."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 4096), (1000, 17), (64, 64), (4096, 16), (5000,)]  # 17000 and 5000: tail blocks
    ours, ref = [], []
    for shape in shapes:
        state = q8.init_8bit(torch.empty(shape))
        m, v = torch.randn(shape, generator=gen) * 1e-2, torch.rand(shape, generator=gen) * 1e-4
        q8.requantize_(state, m, v)
        ours.append({k: t.clone() for k, t in state.items()})
        ref.append(state)
    chunk = q8.Chunk8bit(ours)
    for i, state in enumerate(ref):
        m, v = q8.dequantize(state)
        assert torch.equal(chunk.m[i], m) and torch.equal(chunk.v[i], v)
        # the same arbitrary update on both sides, then back to codes
        new_m, new_v = m * 0.9 + 1e-3 * torch.randn(m.shape, generator=gen), v * 0.999 + m.square()
        chunk.m[i].copy_(new_m)
        chunk.v[i].copy_(new_v)
        q8.requantize_(state, new_m, new_v)
    chunk.requantize_()
    for a, b in zip(ours, ref, strict=True):
        for key in q8.Q8_KEYS:
            assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key
