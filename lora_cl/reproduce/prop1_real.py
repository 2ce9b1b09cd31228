"""Proposition 1 during real LoRA training: R_eta, R_v and the old-direction step vs alpha.

Train the first domain of a stream (LoRA, decoupled routing, raw-gradient rows buffered), build
its rank-32 gradient bases, then from that same adapter train the second domain ``steps`` steps
once per (alpha, routing) with ``Projection(FixedStrength(alpha), weighted=False)`` on the
first domain's bases and a fresh Adam state, over the same batches. Over the second half of
the steps we average, per LoRA tensor with a basis U (probes of :mod:`lora_cl.diagnostics.probes`):

    R_eta = eta_U(shared) / eta_U(decoupled)            predicted 1/(1-alpha)
    R_v   = E_U(v, decoupled) / E_U(v, shared)          predicted 1/(1-alpha)^2
    R_dW  = ||dW U||(shared) / ||dW U||(decoupled)      predicted 1/(1-alpha)

(the last: shared routing restores the full step along U, decoupled keeps it attenuated by
1-alpha). lora_A tensors (fan-in = hidden size) have rotated bases, where the proposition's
coordinate-wise argument is diluted; lora_B tensors (fan-in = r <= basis rank) have bases
spanning all of fan-in, the aligned case. Both are reported apart and together.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_cl.diagnostics.probes import old_direction_lr, v_energy_in_subspace
from lora_cl.diagnostics.prop1 import DEFAULT_ALPHAS
from lora_cl.subspace import GradientRowBuffer

Log = Callable[[str], None]
GROUPS = ("lora_A", "lora_B", "all")


def _group(name: str) -> str:
    return "lora_B" if "lora_B" in name else "lora_A"


def _batches(dataset: Any, collate: Any, n: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n * batch_size:
        order += torch.randperm(len(dataset), generator=gen).tolist()
    return [collate([dataset[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(n)]


def _train(model: Any, optimizer: Any, batches: Sequence[dict[str, torch.Tensor]],
           on_step: Callable[[int], None] | None = None) -> None:
    model.train()
    for t, batch in enumerate(batches):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t)


def _measure(model: Any, optimizer: Any, bank: Any, batches: Sequence[dict[str, torch.Tensor]],
             measure_from: int) -> dict[str, dict[str, float]]:
    """Train over ``batches``; mean eta_U, E_U(v) and ||dW U|| per group from ``measure_from`` on."""
    names, params = optimizer.routed_named_params()
    group = optimizer.param_groups[0]
    beta2, eps, lr = group["betas"][1], group["eps"], float(group["lr"])
    tracked = [(n, p, bank.projector(n, "in", device=p.device)[0]) for n, p in zip(names, params, strict=True)
               if p.ndim >= 2 and bank.projector(n, "in") is not None]
    sums = {g: {"eta": 0.0, "v": 0.0, "dw": 0.0, "n": 0} for g in GROUPS}
    before: dict[str, torch.Tensor] = {}

    def snapshot(_: int | None = None) -> None:
        for n, p, _u in tracked:
            before[n] = p.detach().clone()

    def on_step(t: int) -> None:
        if t >= measure_from:
            for n, p, U in tracked:
                st = optimizer.state[p]
                step = float(st["step"])
                values = {"eta": old_direction_lr(st["exp_avg_sq"], U, step, lr, beta2, eps),
                          "v": v_energy_in_subspace(st["exp_avg_sq"], U, step, beta2),
                          "dw": float(((p.detach() - before[n]).float() @ U).norm())}
                for g in (_group(n), "all"):
                    for k, x in values.items():
                        sums[g][k] += x
                    sums[g]["n"] += 1
        snapshot()

    snapshot()
    _train(model, optimizer, batches, on_step)
    return {g: {k: s[k] / s["n"] for k in ("eta", "v", "dw")} for g, s in sums.items() if s["n"]}


def run_prop1_real(recipe: Any, *, prev_steps: int, steps: int, alphas: Sequence[float] = DEFAULT_ALPHAS,
                   seed: int = 0, log: Log | None = None) -> dict[str, Any]:
    """Measure R_eta, R_v and R_dW vs alpha on the first two domains of ``recipe`` (see module doc)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lora_cl.data.examples import pad_collate
    from lora_cl.trainer.optimizer_factory import make_optimizer
    from lora_cl.trainer.stream import load_peft_model, load_stream_data

    log = log or (lambda _: None)
    start = time.perf_counter()
    data, _ = load_stream_data(recipe, log)
    if len(data) < 2:
        raise ValueError("prop1 (real training) needs a stream of at least two domains")
    model, tokenizer = load_peft_model(recipe)
    collate = pad_collate(tokenizer)
    bs, lr = recipe.training.batch_size, recipe.training.lr
    torch.manual_seed(seed)
    first = make_optimizer(model, "ogp-fixed", lr=lr, weighted=False)
    first.start_domain(data[0].name)
    log(f"prop1 (real): {prev_steps} steps on {data[0].name!r} to build its bases")
    _train(model, first, _batches(data[0].train, collate, prev_steps, bs, seed))
    first.end_domain(data[0].name)
    bank = first.bank
    added = sum(m.build(bank, data[0].name, seed=seed) for m in first.modifiers
                if isinstance(m, GradientRowBuffer))
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    batches = _batches(data[1].train, collate, steps, bs, seed + 1)
    points = []
    for alpha in alphas:
        measured = {}
        for routing in ("shared", "decoupled"):
            set_peft_model_state_dict(model, adapter)
            opt = make_optimizer(model, "ogp-fixed", lr=lr, routing=routing, alpha=float(alpha),
                                 weighted=False, bank=copy.deepcopy(bank))
            opt.start_domain(data[1].name)
            torch.manual_seed(seed + 1)
            measured[routing] = _measure(model, opt, bank, batches, steps // 2)
        point: dict[str, Any] = {"alpha": float(alpha), "predicted_lr_ratio": 1 / (1 - alpha),
                                 "predicted_v_ratio": 1 / (1 - alpha) ** 2, "groups": {}}
        for g in measured["shared"]:
            sh, de = measured["shared"][g], measured["decoupled"][g]
            point["groups"][g] = {"lr_ratio": sh["eta"] / de["eta"], "v_ratio": de["v"] / sh["v"],
                                  "update_ratio": sh["dw"] / de["dw"] if de["dw"] > 0 else None,
                                  "shared": sh, "decoupled": de}
        a = point["groups"].get("all", {})
        log(f"  alpha={alpha:.1f}  R_eta={a.get('lr_ratio', float('nan')):.3f} (pred "
            f"{point['predicted_lr_ratio']:.3f})  R_dW={a.get('update_ratio') or float('nan'):.3f}")
        points.append(point)
    return {"complete": True, "domains": [d.name for d in data[:2]], "bases_added": added,
            "prev_steps": prev_steps, "steps": steps, "measured_over_steps": steps - steps // 2,
            "seed": seed, "lr": lr, "batch_size": bs, "points": points,
            "train_seconds": time.perf_counter() - start}


def write_result(path: Path, doc: dict[str, Any]) -> None:
    from lora_cl.trainer.run_files import write_json

    write_json(path, doc)
