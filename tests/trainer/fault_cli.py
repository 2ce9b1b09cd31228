"""Test-only entry point: ``lora-cl`` with a fault injected into the stream (kill -9 or a NaN).

    python tests/trainer/fault_cli.py kill:<domain index>:<step>|end  train RECIPE ...
    python tests/trainer/fault_cli.py nan:<domain index>:<step>       train RECIPE ...

``kill:i:end`` kills when domain i's Trainer ends (trained, neither evaluated nor saved);
``nan:i:s`` writes a NaN into a gradient before optimizer step s of domain i. Fault injection
lives here, not in lora_cl: nothing a user's environment sets can corrupt a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback

from lora_cl.cli import main


class Fault(TrainerCallback):
    def __init__(self, spec: str, index: int) -> None:
        kind, at_index, at = spec.split(":")
        self.kind, self.at = kind, at
        self.armed = int(at_index) == index

    def _kill(self, at: str) -> None:
        if self.armed and self.kind == "kill" and self.at == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.armed and self.kind == "nan" and int(self.at) == state.global_step + 1:
            with contextlib.suppress(StopIteration):
                p = next(p for p in kwargs["model"].parameters() if p.grad is not None)
                p.grad.view(-1)[0] = float("nan")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._kill(str(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._kill("end")


if __name__ == "__main__":
    spec = sys.argv[1]
    main(sys.argv[2:], callbacks=[lambda index, name: Fault(spec, index)])
