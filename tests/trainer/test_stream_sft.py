"""The continual stream through trl.SFTTrainer on prompt/completion data (completion-only loss)."""

from __future__ import annotations

from typing import Any

from trainer_helpers import QA_DOMAINS, Recorder, lora_model, qa_dataset
from trl import SFTConfig, SFTTrainer

import lora_cl
from lora_cl.modifiers import ReplayMix


def sft_domain(model: Any, tok: Any, optimizer: Any, callback: lora_cl.ContinualCallback,
               name: str, out: Any, extra: list[Any]) -> SFTTrainer:
    args = SFTConfig(output_dir=str(out / name), use_cpu=True, report_to=[], save_strategy="no",
                     max_steps=3, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
                     max_length=32, bf16=False, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=qa_dataset(QA_DOMAINS[name]),
                         processing_class=tok, optimizers=(optimizer, None), callbacks=extra)
    lora_cl.attach(trainer, callback)
    callback.set_domain(name)
    trainer.train()
    return trainer


def test_sft_ogp_stream(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp", lr=1e-3)
    callback, reporter = lora_cl.ContinualCallback(probe_every=1), Recorder()
    for i, name in enumerate(QA_DOMAINS):
        trainer = sft_domain(model, tok, optimizer, callback, name, tmp_path, [reporter])
        assert optimizer.bank.domains() == list(QA_DOMAINS)[: i + 1]
        # completion-only loss: the prompt tokens are masked, the completion tokens are not
        for row in trainer.train_dataset:
            labels = row["labels"]
            assert labels[0] == -100 and labels[-1] != -100
    lora_a = {n for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad}
    lora_b = {n for n, p in model.named_parameters() if "lora_B" in n and p.shape[0] > 32}  # q, not v
    assert set(optimizer.bank.names("in")) == lora_a and set(optimizer.bank.names("out")) == lora_b
    logs = [lg for lg in reporter.logs if "loss" in lg]
    assert len(logs) == 9 and all("projection/alpha" in lg for lg in logs)
    assert all("projection/overlap" in lg for lg in logs[3:])
    assert callback.domains == list(QA_DOMAINS)


def test_sft_replay_mixes_tokenised_examples(tiny_factory, tmp_path):
    model, tok = lora_model(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "replay", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    (mix,) = [m for m in optimizer.modifiers if isinstance(m, ReplayMix)]
    names = list(QA_DOMAINS)[:2]
    sft_domain(model, tok, optimizer, callback, names[0], tmp_path, [])
    assert (mix.mixed_steps, mix.unmixed_steps) == (0, 3)
    sft_domain(model, tok, optimizer, callback, names[1], tmp_path, [])
    assert (mix.mixed_steps, mix.unmixed_steps) == (3, 3)
    assert [d for d, _ in callback.replay.entries] == names  # one kept example each (0.5% of 8)
    assert callback.last_replay_loss is not None and callback.last_replay_loss > 0
