"""The gradient-modifier protocol: small transformations g -> g~, chained in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GradBatch:
    """Everything a modifier sees for one optimizer step (routed tensors only).

    ``grads`` holds the gradient as modified by the modifiers earlier in the chain;
    ``raw`` is the untouched loss gradient g. Both are fp32 and must never be
    modified in place: a modifier that changes gradient i returns a new tensor at
    position i and returns the incoming tensor object unchanged otherwise (the
    optimizer uses ``out[i] is raw[i]`` to know that g~ = g exactly).
    """

    names: list[str]
    params: list[Tensor]
    grads: list[Tensor]
    raw: list[Tensor]
    step: int
    extras: dict[str, Any] = field(default_factory=dict)
    #: squared norms of raw gradients a modifier computed anyway (batch index -> 0-d or (n,)
    #: stacked tensor with the indices of its items), which the device guard reuses
    raw_sq_norms: list[tuple[list[int], Tensor]] = field(default_factory=list)
    #: set by the optimizer when g~ feeds only the first moment (decoupled routing, decided on the
    #: device) and no modifier after this one changes g: a modifier may then leave ``grads[i]``
    #: as it is and hand over g~ - g instead, as a function in ``m_delta_fns``. The optimizer
    #: calls each once, past its guard, with the step's ``keep`` flag (a 0-d bool tensor; False
    #: must give exact zeros, NaN inputs included), and adds the returned {batch index: g~ - g}
    #: to m before the fused kernel: g~ itself is never formed (RoutedAdamW._device_step). An
    #: entry may also offer ``idx`` (the batch indices it changes), ``whole_group`` and
    #: ``add_into(m, keep, scale)``: m += scale * (g~ - g) into those tensors' first moments
    #: stacked in one (n, *shape) tensor, in one pass (the projection's product writes into m)
    m_only: bool = False
    m_delta_fns: list[Callable[[Tensor], dict[int, Tensor]]] = field(default_factory=list)


class GradientModifier:
    """Base class: maps a :class:`GradBatch` to the list of modified gradients g~.

    Subclasses override :meth:`apply`; the domain hooks, ``state_dict`` and
    ``metrics`` are optional. A modifier never sees or touches optimizer state.

    A step is a transaction: :meth:`apply` computes g~ and *stages* whatever it observed
    (EMAs, buffered rows, counters); the optimizer calls :meth:`commit` only once the step
    passed its non-finite guard, so a skipped step leaves every modifier's state as it was.
    Calling the modifier (``mod(batch)``) does both, for use outside an optimizer.

    ``additive`` says which second-moment rule decoupled routing uses (docs/concepts.md):
    attenuating modifiers (projection, importance rescaling; ``False``) keep v on the raw
    g, the paper's repair; additive ones (replay mixing, the EWC penalty, A-GEM; ``True``)
    add a term that can be far larger than g, so v takes max(g^2, g~^2) per coordinate and
    the step keeps Adam's bound. ``needs_names`` marks modifiers keyed by tensor name
    (bases, replay gradients): the optimizer refuses unnamed routed tensors for them.

    ``device_commit`` marks modifiers whose :meth:`commit` takes ``keep``, a 0-d bool tensor the
    optimizer decided on the device (False: the step is skipped), and persists the staged state
    only where it holds, with no host read (``torch.where``): with every modifier of the chain so,
    RoutedAdamW's default guard needs no host sync (docs/performance.md). Others are committed
    on the host, once the guard has read its flag.

    ``contracts`` marks modifiers whose g~ is never larger than the g it came from (a projection
    with strengths and weights in [0, 1]: ||g~|| <= ||g|| per tensor, each intermediate bounded by
    ||g||), so a finite norm of g makes g~ finite: the device guard then checks g alone.
    """

    additive: bool = False
    needs_names: bool = False
    device_commit: bool = False
    contracts: bool = False

    def apply(self, batch: GradBatch) -> list[Tensor]:
        raise NotImplementedError

    def __call__(self, batch: GradBatch) -> list[Tensor]:
        """Apply and commit at once (a modifier used on its own); the optimizer calls the two apart."""
        out = self.apply(batch)
        self.commit()
        return out

    def commit(self, keep: Tensor | None = None) -> None:
        """Persist what the last :meth:`apply` staged (called only for a step that is taken, or
        with ``keep`` where ``device_commit`` is True)."""

    def on_domain_start(self, domain: str) -> None:
        """Called when training on ``domain`` begins (reset per-domain statistics)."""

    def on_domain_end(self, domain: str, names: list[str], params: list[Tensor]) -> None:
        """Called when training on ``domain`` ends (consolidate what was observed)."""

    @property
    def consolidates(self) -> bool:
        """Whether it reads the parameters at a domain's end (overrides :meth:`on_domain_end`, as
        EWC does): sharded optimizers (ZeRO, FSDP2) hold them as partitions there."""
        return type(self).on_domain_end is not GradientModifier.on_domain_end

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging (read lazily: may synchronise the device)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")


def unchanged(batch: GradBatch) -> list[Tensor]:
    """The identity result (same tensor objects), for modifiers that only observe."""
    return list(batch.grads)


def as_matrix(t: Tensor) -> Tensor:
    """View a >=2-D weight as (fan_out, fan_in): dim 0 is the output side, the rest the input side.

    A Linear weight (out, in) is itself; a Conv weight (out, in, kh, kw) is (out, in*kh*kw), the
    space its unfolded input patches live in (peft's conv lora_A is (r, c, kh, kw)).
    """
    return t.reshape(t.shape[0], -1)


def fan_in(t: Tensor) -> int:
    """The input-side dimension of a >=2-D weight: every dim but the first, multiplied."""
    return t[0].numel() if t.shape[0] else int(torch.Size(t.shape[1:]).numel())
