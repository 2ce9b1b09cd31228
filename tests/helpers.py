"""Helpers several test modules share (import as ``from helpers import ...``; tests/ is on the
path through its conftest). One place for each, so a fix reaches every caller."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_cl.modifiers.base import GradBatch

REPO = Path(__file__).resolve().parents[1]
#: ``torchrun`` on 2 processes of this interpreter (gloo on a CPU); append the script or ``-m ...``.
TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_env(cache: Path | None = None, *paths: Path) -> dict[str, str]:
    """The environment of a test's ``torchrun`` (or single) subprocess: one thread per process (two
    ranks on two cores), the repo (and ``paths``) importable, ``LORA_CL_CACHE`` set to ``cache``
    when given, and no RANK/WORLD_SIZE/LOCAL_RANK inherited from a launcher around the tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *map(str, paths), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["LORA_CL_CACHE"] = str(cache)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` as JSON lines at ``path`` (UTF-8); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def torch_round_trip(obj: Any) -> Any:
    """``obj`` through an in-memory ``torch.save`` / ``torch.load(weights_only=True)``, as the HF
    Trainer saves and loads ``optimizer.pt``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def grad_batch(grads: Sequence[torch.Tensor], names: Sequence[str] | None = None, *,
               params: Sequence[torch.Tensor] | None = None, step: int = 1,
               extras: dict[str, Any] | None = None) -> GradBatch:
    """A GradBatch as RoutedAdamW builds one: names t0, t1, ... unless given, zero params unless
    given, raw gradients equal to the (copied list of) gradients."""
    names = list(names) if names is not None else [f"t{i}" for i in range(len(grads))]
    params = list(params) if params is not None else [torch.zeros_like(g) for g in grads]
    return GradBatch(names=names, params=params, grads=list(grads), raw=list(grads), step=step,
                     extras=extras or {})


def tiny_peft_model(factory: Any, *, r: int = 4, lora_alpha: int = 8,
                    target_modules: Sequence[str] = ("q_proj", "v_proj"),
                    modules_to_save: list[str] | None = None) -> tuple[Any, Any]:
    """The one tiny peft model of the suite: a fresh copy of the tiny random Llama from
    ``factory`` (the ``tiny_factory`` fixture) with LoRA r=4, alpha 8, no dropout on q_proj and
    v_proj unless told otherwise; returns (peft model, tokenizer)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = factory()
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules),
                        modules_to_save=modules_to_save)
    return get_peft_model(model, config), tokenizer


def domain_adapters(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every domain's saved adapter of a `lora-cl train` method run directory, by domain folder."""
    from safetensors.torch import load_file

    return {d.name: load_file(str(d / "adapter" / "adapter_model.safetensors"))
            for d in sorted((run / "domains").iterdir())}


def assert_same_adapters(got_run: Path, want_run: Path, *, domains: int = 3, **tol: float) -> None:
    """Two method runs saved the same adapters in every domain (within ``tol``; default exact to 1e-7)."""
    got, want = domain_adapters(got_run), domain_adapters(want_run)
    assert got.keys() == want.keys() and len(want) == domains
    tol = tol or {"rtol": 0.0, "atol": 1e-7}
    for ddir in want:
        for key in want[ddir]:
            torch.testing.assert_close(got[ddir][key], want[ddir][key], **tol,
                                       msg=lambda m, k=key, d=ddir: f"{d} {k}: {m}")


def zero3_config(tmp: Path, *, persistence: int | None = None) -> str:
    """deepspeed_configs/zero3.json written into ``tmp``, with ``stage3_param_persistence_threshold``
    set when given (0: DeepSpeed keeps no tensor whole between steps, a 7B model's LoRA tensors'
    case)."""
    doc = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    if persistence is not None:
        doc["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    path = tmp / "zero3.json"
    path.write_text(json.dumps(doc))
    return str(path)
