"""What a domain needs at its boundaries: checks on its data, its bases, its adapter snapshot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from lora_cl.methods import MethodSpec
from lora_cl.optim import RoutedAdamW
from lora_cl.subspace import (
    ActivationSample,
    GradientRowBuffer,
    SubspaceBank,
    activation_bases,
    adapter_bases,
)
from lora_cl.trainer.replay import Collate, ReplayDataError, collate_chunks, is_indexable, seeded_subset

DEFAULT_ACTIVATION_ENERGY = 0.97
_ADVICE = ("pass rows shaped like the training data (e.g. the tokenised trainer.train_dataset) or "
           "leave train_dataset=None to use the dataset the Trainer trains on")


def check_domain_data(spec: MethodSpec, name: str, source: Any, collate: Collate | None, *,
                      has_basis_batches: bool, user_rows: bool, replay_source: Any = None) -> None:
    """Raise :class:`ReplayDataError` now if replay or an activation basis could not be built later."""
    replay = spec.replay is not None
    if replay and not is_indexable(source):
        raise ReplayDataError(
            f"domain {name!r}: method {spec.name!r} replays examples of earlier domains, but this "
            f"domain's data cannot be kept (the Trainer's dataset is {type(source).__name__}, not "
            f"indexable): pass callback.set_domain({name!r}, train_dataset=<a map-style dataset>)")
    # (activation_sample="last_steps" samples the training forwards: no examples needed later)
    sample = spec.basis == "activation" and not has_basis_batches and spec.activation_sample == "end"
    if sample and not is_indexable(source):
        raise ReplayDataError(
            f"domain {name!r}: activation bases need a sample of the domain: pass "
            f"callback.set_domain({name!r}, basis_batches=[...]) or a map-style train_dataset")
    if not (replay or sample):
        return
    if collate is None:
        raise ReplayDataError(f"domain {name!r}: no data collator found on the Trainer's train "
                              "dataloader to batch replay/basis examples")
    wanted = "labels" if replay else "input_ids"
    if user_rows:
        _check_rows(name, "train_dataset", source, collate, wanted)
    if replay and replay_source is not None:
        _check_rows(name, "replay_source", replay_source, collate, "labels")


def _check_rows(name: str, label: str, rows: Any, collate: Collate, wanted: str) -> None:
    """The Trainer's collator batches ``rows[0]`` into a batch holding ``wanted``."""
    if not len(rows):
        raise ReplayDataError(f"domain {name!r}: set_domain({label}=...) is empty")
    try:
        batch = collate([rows[0]])
    except Exception as err:  # the user's rows do not fit the Trainer's collator
        raise ReplayDataError(
            f"domain {name!r}: set_domain({label}=...) rows cannot be batched by the Trainer's "
            f"data collator ({type(err).__name__}: {err}); {_ADVICE}") from err
    if wanted not in batch:
        raise ReplayDataError(f"domain {name!r}: set_domain({label}=...) rows batch to keys "
                              f"{sorted(batch)} without {wanted!r}; {_ADVICE}")


def build_domain_bases(spec: MethodSpec, optimizer: RoutedAdamW, bank: SubspaceBank | None,
                       model: nn.Module, name: str, *, seed: int,
                       basis_batches: Iterable[Mapping[str, Any]] | None = None, source: Any = None,
                       collate: Collate | None = None, batch_size: int = 8,
                       activation_sample: ActivationSample | None = None) -> int:
    """Add domain ``name``'s bases to ``bank`` from the method's source; return how many were added.

    gradient: each GradientRowBuffer of the chain (raw-gradient rows of the domain's last steps);
    adapter: dW = scaling * B A of every LoRA layer; activation: layer inputs on
    ``basis_batches``, else on ``spec.basis_examples`` seeded examples of ``source``, or from
    ``activation_sample`` (the domain's last training forwards, ``activation_sample="last_steps"``:
    no forward here) (plus the gradient-row buffers of ``basis_out="gradient"``).
    """
    if spec.basis is None or bank is None:
        return 0
    if spec.basis == "gradient":
        return sum(m.build(bank, name, seed=seed) for m in optimizer.modifiers
                   if isinstance(m, GradientRowBuffer))
    if spec.basis == "adapter":
        return adapter_bases(model, bank, name, rank=spec.basis_rank, energy=spec.basis_energy)
    energy = spec.basis_energy if spec.basis_energy is not None else DEFAULT_ACTIVATION_ENERGY
    if activation_sample is not None:
        added = activation_sample.add_bases(bank, name, energy=energy, max_rank=spec.basis_rank)
        return added + sum(m.build(bank, name, seed=seed) for m in optimizer.modifiers
                           if isinstance(m, GradientRowBuffer))
    if basis_batches is None:
        if collate is None or not is_indexable(source):
            raise ReplayDataError(f"domain {name!r}: activation bases need basis_batches or a "
                                  "map-style dataset and a collator")
        idx = seeded_subset(len(source), spec.basis_examples, seed)
        basis_batches = collate_chunks([source[i] for i in idx], collate, batch_size)
    added = activation_bases(model, basis_batches, bank, name, energy=energy,
                             max_rank=spec.basis_rank, seed=seed)
    # basis_out="gradient": lora_B's output-side bases from its buffered gradient rows
    return added + sum(m.build(bank, name, seed=seed) for m in optimizer.modifiers
                       if isinstance(m, GradientRowBuffer))


def adapter_snapshot(model: nn.Module, optimizer: RoutedAdamW) -> dict[str, Tensor]:
    """CPU copies of the adapter weights (peft's adapter state dict, else the routed tensors)."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        tensors = get_peft_model_state_dict(model)
    else:
        tensors = dict(zip(*optimizer.routed_named_params(), strict=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
