"""training.fused_loss: the plain Trainer's loss through trl's fused LM head equals the usual loss."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_helpers as H  # noqa: E402

from lora_cl.recipe import recipe_from_dict  # noqa: E402
from lora_cl.trainer.fused_loss import FusedLossTrainer  # noqa: E402
from lora_cl.trainer.stream import run_stream  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = REPO / "recipes" / "data" / "tiny"


def _loss_and_grads(trainer_cls, tiny_factory, tmp_path, num_items=None):  # noqa: ANN001
    torch.manual_seed(0)
    model, tok = H.lora_model(tiny_factory)
    with torch.no_grad():  # LoRA B starts at 0: give the adapter a value so its A gets gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    data = H.lm_dataset(tok, H.DOMAINS["cooking"][:4])  # right-padded rows: -100 labels at the end
    trainer = trainer_cls(model=model, args=H.train_args(tmp_path), train_dataset=data)
    batch = trainer.data_collator([data[i] for i in range(4)])
    assert (batch["labels"] == -100).any()
    model.train()
    head_calls = []
    hook = model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda *_: head_calls.append(1))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    hook.remove()
    # the usual path runs lm_head over all b x s positions; the fused one reads its weight in tiles
    assert len(head_calls) == (0 if trainer_cls is FusedLossTrainer else 1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fused_loss_and_gradients_equal_the_trainer_loss(tiny_factory, tmp_path):
    for num_items in (None, torch.tensor(37)):  # mean over labelled tokens, or the Trainer's count
        want_loss, want = _loss_and_grads(H.Trainer, tiny_factory, tmp_path / "a", num_items)
        got_loss, got = _loss_and_grads(FusedLossTrainer, tiny_factory, tmp_path / "b", num_items)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert want.keys() == got.keys() and any(g.abs().max() > 0 for g in want.values())
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_stream_with_fused_loss_trains_like_the_usual_loss(tmp_path, test_cache_dir):
    def run(fused: bool) -> Path:
        doc = {
            "model": {"name": "tiny"},
            "domains": [str(TINY_DATA / f"{n}.txt") for n in ("cooking", "astronomy")],
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "method": "ogp",
            "data": {"seq_len": 32, "eval_examples": 3},
            "training": {"steps_per_domain": 3, "batch_size": 2, "save_steps": 10, "lr": 1e-3,
                         "fused_loss": fused},
            "eval": {"batch_size": 4, "generate": False},
            "output_dir": str(tmp_path / ("fused" if fused else "usual")),
        }
        (run_dir,) = run_stream(recipe_from_dict(doc), progress=False, log=lambda _: None)
        return run_dir

    usual, fused = run(False), run(True)
    for ddir in sorted((usual / "domains").iterdir()):
        want = load_file(str(ddir / "adapter" / "adapter_model.safetensors"))
        got = load_file(str(fused / "domains" / ddir.name / "adapter" / "adapter_model.safetensors"))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
