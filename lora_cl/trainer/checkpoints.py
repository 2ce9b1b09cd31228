"""Trainer checkpoints of a stream: where they live and the marker that says one is complete."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from lora_cl.trainer.callback import ContinualCallback
from lora_cl.trainer.run_files import write_json

MARKER = "lora_cl_checkpoint.json"  # written after the Trainer finished a checkpoint


def latest_checkpoint(root: Path) -> Path | None:
    """The newest ``checkpoint-N`` under ``root`` that the Trainer finished writing (marked)."""
    if not root.is_dir():
        return None
    marked = [(int(m.group(1)), p) for p in root.iterdir()
              if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / MARKER).is_file()]
    return max(marked)[1] if marked else None


def checkpoint_root(run_dir: Path, i: int, name: str) -> Path:
    return run_dir / "checkpoints" / f"{i:02d}-{name}"


class CheckpointMarker(TrainerCallback):
    """Marks a Trainer checkpoint complete (the Trainer writes it non-atomically, then calls on_save).

    No checkpoint at a domain's last step: the domain directory follows it, and a Trainer resumed
    from a checkpoint at ``max_steps`` trains one step too many (transformers 5.24). None inside
    the steps an ``activation_sample="last_steps"`` method samples either: the sample is not
    saved, so a resume from before them samples them all again (exact resume).
    """

    def __init__(self, callback: ContinualCallback, domain: str) -> None:
        self.callback, self.domain = callback, domain

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = False
        sample_from = self.callback.sample_from  # activation_sample="last_steps": not mid-sample
        if sample_from is not None and state.global_step > sample_from:
            control.should_save = False

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            write_json(ckpt / MARKER, {"domain": self.domain, "step": state.global_step,
                                        "callback": self.callback.state_dict()})
