"""Build the stream's one RoutedAdamW from a method preset, and find it behind Trainer wrappers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lora_cl.grouping import param_groups
from lora_cl.methods import MethodSpec, build_modifiers, resolve_method
from lora_cl.modifiers import AGEM, Projection, ReplayMix
from lora_cl.optim import RoutedAdamW
from lora_cl.subspace import GradientRowBuffer, SubspaceBank

HOW_TO_PASS = ("build it with lora_cl.make_optimizer(model, method=...) and hand it over as "
               "Trainer(..., optimizers=(optimizer, None)) (or optimizer_cls_and_kwargs="
               "lora_cl.RoutedAdamWFactory(method=...).cls_and_kwargs())")


def make_optimizer(model: nn.Module, method: str | MethodSpec = "ogp", *, lr: float = 1e-4,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, bank: SubspaceBank | None = None, impl: str = "auto",
                   nonfinite: str = "skip", state_bits: int = 32, route: str = "lora",
                   min_8bit_size: int | None = None, **overrides: Any) -> RoutedAdamW:
    """A RoutedAdamW for ``model`` running the preset ``method`` (fields overridden by ``overrides``).

    LoRA tensors go in one group with the method's routing, every other trainable tensor in a
    ``routing="vanilla"`` group (plain AdamW). The resolved spec and the bank are attached as
    ``optimizer.lora_cl_method`` and ``optimizer.bank`` for :class:`~lora_cl.ContinualCallback`.
    ``lr`` is the peak rate the Trainer's scheduler starts from (``args.learning_rate`` is not used).
    ``state_bits=8`` keeps m and v as 8-bit blockwise states (bitsandbytes' format), for tensors
    of at least ``min_8bit_size`` elements (None: RoutedAdamW's default, 4096).
    ``route="linear"`` fully finetunes a plain model: every linear layer's weight is routed
    (:func:`~lora_cl.grouping.param_groups`); use a one-sided ``-in`` preset there (the paper's
    full-parameter setting), since side ``"both"`` projects each weight on both of its sides.
    """
    spec = resolve_method(method, overrides)
    if bank is None and spec.needs_bank:
        bank = SubspaceBank(mode=spec.bank_mode, max_rank=spec.bank_max_rank)
    groups = param_groups(model, routing=spec.routing, route=route)
    optimizer = RoutedAdamW(groups, lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay, modifiers=build_modifiers(spec, bank),
                            reproject_update=spec.reproject_update, nonfinite=nonfinite, impl=impl,
                            state_bits=state_bits,
                            **({} if min_8bit_size is None else {"min_8bit_size": min_8bit_size}))
    optimizer.lora_cl_method = spec
    optimizer.bank = bank
    return optimizer


class RoutedAdamWFactory:
    """``optimizer_cls_and_kwargs`` for a Trainer: builds :func:`make_optimizer` on the Trainer's model.

    ``Trainer(..., optimizer_cls_and_kwargs=RoutedAdamWFactory("ogp", lr=1e-4).cls_and_kwargs())``.
    transformers treats a non-Optimizer class as a factory: it calls ``factory()(model)``. The
    optimizer is built once per model and returned again to later Trainers on the same model, so
    a fresh Trainer per domain still steps the stream's one optimizer (read it as ``.optimizer``).
    """

    def __init__(self, method: str | MethodSpec = "ogp", **kwargs: Any) -> None:
        self.method = resolve_method(method, {k: v for k, v in kwargs.items()
                                              if k not in _MAKE_KWARGS})
        self.kwargs = {k: v for k, v in kwargs.items() if k in _MAKE_KWARGS}
        self._built: tuple[weakref.ref[nn.Module], RoutedAdamW] | None = None

    @property
    def optimizer(self) -> RoutedAdamW | None:
        """The optimizer built so far (None before the first Trainer asked)."""
        return None if self._built is None else self._built[1]

    def cls_and_kwargs(self) -> tuple[Callable[[], Callable[..., RoutedAdamW]], dict[str, Any]]:
        """The ``(factory, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``."""
        return self, {}

    def __call__(self) -> Callable[..., RoutedAdamW]:
        return self.build

    def build(self, model: nn.Module, **kwargs: Any) -> RoutedAdamW:
        """The stream's optimizer for ``model`` (built on the first call)."""
        if self._built is not None and self._built[0]() is model:
            return self._built[1]
        optimizer = make_optimizer(model, self.method, **{**self.kwargs, **kwargs})
        self._built = (weakref.ref(model), optimizer)
        return optimizer


_MAKE_KWARGS = frozenset({"lr", "weight_decay", "betas", "eps", "bank", "impl", "nonfinite",
                          "state_bits", "route", "min_8bit_size"})


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer behind accelerate's/DeepSpeed's ``.optimizer`` wrappers."""
    seen = 0
    while not isinstance(optimizer, RoutedAdamW) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def routed_optimizer(optimizer: Any) -> RoutedAdamW:
    """The RoutedAdamW a Trainer steps, or a TypeError saying how to hand one over."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, RoutedAdamW):
        return inner
    kind = "no optimizer" if inner is None else (
        f"{type(inner).__module__}.{type(inner).__qualname__}" if isinstance(inner, Optimizer)
        else type(inner).__name__)
    raise TypeError(f"ContinualCallback needs the Trainer to step a lora_cl.RoutedAdamW, but it "
                    f"steps {kind}: {HOW_TO_PASS}.")


def method_of(optimizer: RoutedAdamW) -> MethodSpec:
    """The spec attached by :func:`make_optimizer`, else one inferred from the modifier chain."""
    spec = getattr(optimizer, "lora_cl_method", None)
    if isinstance(spec, MethodSpec):
        return spec
    mods = optimizer.modifiers
    buffers = [m for m in mods if isinstance(m, GradientRowBuffer)]
    replay = ("mix" if any(isinstance(m, ReplayMix) for m in mods)
              else "agem" if any(isinstance(m, AGEM) for m in mods) else None)
    return MethodSpec(name="custom", routing=optimizer.param_groups[0]["routing"],
                      basis="gradient" if buffers else None, replay=replay)


def bank_of(optimizer: RoutedAdamW) -> SubspaceBank | None:
    """The bank attached by :func:`make_optimizer`, else the one a Projection modifier uses."""
    bank = getattr(optimizer, "bank", None)
    if isinstance(bank, SubspaceBank):
        return bank
    for mod in optimizer.modifiers:
        if isinstance(mod, Projection):
            return mod.bank
    return None
