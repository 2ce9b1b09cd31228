"""Tiny real-text domains, a LoRA-wrapped tiny Llama and Trainer plumbing for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset
from helpers import tiny_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import lora_cl

SEQ = 32

DOMAINS: dict[str, list[str]] = {
    "cooking": [
        "Whisk the eggs with sugar until the mixture turns pale.",
        "Simmer the tomato sauce gently for ten minutes.",
        "Knead the dough and leave it to rise in a warm place.",
        "Season the soup with salt and black pepper.",
        "Roast the vegetables in a hot oven until golden.",
        "Fold the whipped cream gently into the batter.",
        "Chop the onions finely before frying them in butter.",
        "Let the bread cool on a wire rack before slicing.",
    ],
    "astronomy": [
        "Jupiter is the largest planet in the solar system.",
        "A light year measures a distance, not a time.",
        "The Moon orbits the Earth about every twenty seven days.",
        "Neutron stars are the extremely dense remnants of supernovae.",
        "Saturn's rings are made mostly of ice and rock.",
        "A galaxy can contain hundreds of billions of stars.",
        "Mars looks red because its dust is rich in iron oxide.",
        "Comets grow long tails as they approach the Sun.",
    ],
    "law": [
        "A contract needs an offer, an acceptance and consideration.",
        "The court dismissed the appeal for lack of jurisdiction.",
        "A tenant must give written notice before leaving the flat.",
        "The defendant is presumed innocent until proven guilty.",
        "Copyright protects the expression of an idea, not the idea.",
        "The witness swore an oath before giving evidence.",
        "A will must be signed in the presence of two witnesses.",
        "The judge adjourned the hearing until next Monday.",
    ],
}

QA_DOMAINS: dict[str, list[tuple[str, str]]] = {
    "capitals": [
        ("What is the capital of France?", " Paris."), ("What is the capital of Japan?", " Tokyo."),
        ("What is the capital of Italy?", " Rome."), ("What is the capital of Spain?", " Madrid."),
        ("What is the capital of Egypt?", " Cairo."), ("What is the capital of Peru?", " Lima."),
        ("What is the capital of Kenya?", " Nairobi."), ("What is the capital of Chile?", " Santiago."),
    ],
    "arithmetic": [
        ("What is two plus two?", " Four."), ("What is three times three?", " Nine."),
        ("What is ten minus one?", " Nine."), ("What is six divided by two?", " Three."),
        ("What is five plus five?", " Ten."), ("What is seven minus four?", " Three."),
        ("What is two times four?", " Eight."), ("What is nine divided by three?", " Three."),
    ],
    "colours": [
        ("What colour is the sky on a clear day?", " Blue."), ("What colour is grass?", " Green."),
        ("What colour is snow?", " White."), ("What colour is a ripe banana?", " Yellow."),
        ("What colour is coal?", " Black."), ("What colour is a ripe tomato?", " Red."),
        ("What colour are most oranges?", " Orange."), ("What colour is a violet?", " Purple."),
    ],
}


def lora_model(tiny_factory: Any, modules_to_save: list[str] | None = None) -> tuple[Any, Any]:
    """A fresh tiny Llama with LoRA r=4 on q_proj, v_proj (and its tokenizer): the suite's one
    builder, helpers.tiny_peft_model."""
    return tiny_peft_model(tiny_factory, modules_to_save=modules_to_save)


def lm_dataset(tokenizer: Any, texts: list[str]) -> Dataset:
    """Texts tokenised and padded to SEQ tokens; labels = input ids, -100 on padding."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ)
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})


def qa_dataset(pairs: list[tuple[str, str]]) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


def qa_jsonl(folder: Path, names: tuple[str, ...] = ("capitals", "colours")) -> list[str]:
    """``QA_DOMAINS`` as prompt/completion JSONL files (each pair twice), one per domain; their paths."""
    paths = []
    for name in names:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "completion": c.strip()}) + "\n"
                                for p, c in QA_DOMAINS[name] * 2), encoding="utf-8")
        paths.append(str(path))
    return paths


def train_args(out: Path, **overrides: Any) -> TrainingArguments:
    """CPU, no reporting, no checkpoints, 3 steps of 4 examples, a log every step."""
    kwargs: dict[str, Any] = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="no",
                                  max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                                  disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class Recorder(TrainerCallback):
    """Records every ``logs`` dict it is shown (a stand-in for a report_to integration)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


def run_domain(model: Any, tokenizer: Any, optimizer: Any, callback: lora_cl.ContinualCallback,
               name: str, texts: list[str], out: Path, *, extra: list[Any] | None = None,
               **args: Any) -> Trainer:
    """One domain of the stream: a fresh Trainer sharing model, optimizer and callback."""
    trainer = Trainer(model=model, args=train_args(out / name, **args),
                      train_dataset=lm_dataset(tokenizer, texts), optimizers=(optimizer, None),
                      callbacks=list(extra or []))
    lora_cl.attach(trainer, callback)
    callback.set_domain(name)
    trainer.train()
    return trainer
