"""RoutedAdamW: AdamW whose two moments can see different gradients."""

from __future__ import annotations

import difflib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lora_cl.modifiers.base import GradBatch, GradientModifier
from lora_cl.optim import dtensor as dt
from lora_cl.optim import quantized_state as q8
from lora_cl.optim.functional import (
    FUSED_MIN_BETA1,
    fused_adamw_step,
    fused_kernel_available,
    routed_adamw_fused,
    routed_adamw_reference,
)

#: routing -> (what feeds m, what feeds v); "raw" is g, "mod" is g~ = M(g).
ROUTINGS: dict[str, tuple[str, str]] = {
    "vanilla": ("raw", "raw"),
    "shared": ("mod", "mod"),
    "decoupled": ("mod", "raw"),
    "v_only": ("raw", "mod"),
}
IMPLS = ("auto", "fused", "reference")
NONFINITE = ("skip", "raise", "off")


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``RoutedAdamW.step`` with ``nonfinite="raise"``."""


class RoutedAdamW(Optimizer):
    """AdamW with decoupled moment routing of modified gradients.

    The chain of ``modifiers`` turns the raw gradient g into g~; each param group's
    ``routing`` decides what the moments see (m / v): ``vanilla`` (g, g²), ``shared``
    (g~, g~²: gradient modification handed to Adam, the usual practice), ``decoupled``
    (g~, g²: the repair) and ``v_only`` (g, g~²). Groups with ``routing="vanilla"``
    never run the modifiers. With no modifier every routing is exactly
    ``torch.optim.AdamW`` (decoupled weight decay, bias correction, amsgrad off).

    Args:
        params: tensors or param groups; a group may carry ``routing`` and
            ``param_names`` (names key bases and importances; see
            :func:`lora_cl.param_groups`).
        modifiers: gradient modifiers applied in order to routed groups.
        reproject_update: after the Adam step, pass the final update of each routed
            tensor through the modifiers' ``project_update`` (Adam-NSCL style), since the
            element-wise division by sqrt(v) can move a projected step back into the
            protected subspace.
        nonfinite: ``"skip"`` (warn, naming the tensors, and leave every state
            untouched) or ``"raise"`` when any gradient holds inf/nan; ``"off"`` does not
            look (as ``torch.optim.AdamW``: inf/nan flows into the states). The check reads
            every gradient once (docs/performance.md gives its cost on CPU) unless told the
            norm clipping already took (:meth:`supply_grad_norm`; ``lora_cl.attach`` does so
            in a Trainer), or a projection computed it anyway.
        impl: ``"fused"`` (torch's fused AdamW kernel with first-moment
            pre-correction), ``"reference"`` (readable single-tensor loop) or ``"auto"``.
        state_bits: 32 (fp32 m and v) or 8 (blockwise 8-bit m and v in bitsandbytes'
            format, dequantized around the same update; see :mod:`.quantized_state`).
        min_8bit_size: with ``state_bits=8``, tensors with fewer elements keep fp32 states.

    State layout: as torch's, one ``{"step", "exp_avg", "exp_avg_sq"}`` dict per tensor. Under
    decoupled routing with a one-sided projection, the first moments of the tensors one batched
    projection group covers are kept as rows of one stacked tensor (``exp_avg`` is then a view),
    so the projection's product adds its correction into m in place; the values are those of
    separate tensors, and ``state_dict``/``torch.save`` round trips are exact.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        routing: str = "decoupled",
        modifiers: Sequence[GradientModifier] = (),
        *,
        reproject_update: bool = False,
        nonfinite: str = "skip",
        impl: str = "auto",
        state_bits: int = 32,
        min_8bit_size: int = q8.MIN_8BIT_SIZE,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"RoutedAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"RoutedAdamW: betas must be in [0, 1), got {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"RoutedAdamW: eps must be >= 0, got {eps}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"RoutedAdamW: nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if impl not in IMPLS:
            raise ValueError(f"RoutedAdamW: impl must be one of {IMPLS}, got {impl!r}")
        if isinstance(state_bits, bool) or state_bits not in q8.STATE_BITS:
            raise ValueError(f"RoutedAdamW: state_bits must be 32 (fp32 states) or 8 (8-bit "
                             f"blockwise states), got {state_bits!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"RoutedAdamW: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if state_bits == 8:
            q8.check_available()
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        routing=routing)
        self.modifiers: list[GradientModifier] = list(modifiers)
        for mod in self.modifiers:
            if not isinstance(mod, GradientModifier):
                raise TypeError(
                    f"RoutedAdamW: modifiers must be GradientModifier instances, got {type(mod).__name__}"
                )
        super().__init__(params, defaults)
        self.reproject_update = reproject_update
        self.nonfinite = nonfinite
        self.impl = impl
        self.state_bits = state_bits
        self.min_8bit_size = min_8bit_size
        self._host_step = 0
        self._host_skipped = 0
        # Steps whose skip-or-step was decided on the device (see _device_step): how many,
        # and a device tensor counting the skipped ones, read only when a counter is read.
        self._dev_steps = 0
        self._dev_skips: Tensor | None = None
        self._dev_bad: tuple[list[str], Tensor] | None = None  # (names, their checked norms)
        self._extras: dict[str, Any] = {}
        # supply_grad_norm: (the norm, {id(p): (weakref to p.grad, its _version)}), one step's worth
        self._given_norm: tuple[Tensor, dict[int, tuple[Any, int]]] | None = None
        # the chain's GradBatch.m_delta_fns of this step and the entries they index
        self._delta_fns: tuple[list[dict[str, Any]], list[Any]] = ([], [])
        # Set by a sharded stepper (lora_cl.trainer.zero) that steps one group per call and
        # decides the skip for the whole optimizer: commits wait in _held_commit until it does.
        self._hold_commits = False
        self._held_commit = False
        # the parameters as the groups held them when states were last bound (rebind_states)
        self._bound = [list(g["params"]) for g in self.param_groups]

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups;
        # the modifiers (bank, strength EMAs, buffers), flags and counters are RoutedAdamW too.
        # torch's hook dicts stay out, as in Optimizer: __setstate__ makes fresh ones.
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if key not in state and not key.startswith("_optimizer_") and key != "_zero_grad_profile_name":
                state[key] = value
        state["_given_norm"] = None  # one step's hint, about gradients the copy does not have
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            _check_group_keys(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_routing(group["routing"])
        names = group.get("param_names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"RoutedAdamW: param group {len(self.param_groups) - 1} has "
                             f"{len(group['params'])} params but {len(names)} param_names")
        keyed = [type(m).__name__ for m in getattr(self, "modifiers", ()) if m.needs_names]
        if keyed and names is None and group["routing"] != "vanilla":
            raise ValueError(
                f"RoutedAdamW: {', '.join(keyed)} key(s) bases or replay gradients by tensor name, "
                f"but param group {len(self.param_groups) - 1} has no 'param_names'; build the "
                "groups with lora_cl.param_groups(model) or pass model.named_parameters()")

    # -- domain hooks -------------------------------------------------------------
    def start_domain(self, domain: str) -> None:
        """Tell the modifiers a new domain begins (strength EMAs reset, buffers clear)."""
        for mod in self.modifiers:
            mod.on_domain_start(domain)

    def end_domain(self, domain: str, params: list[Tensor] | None = None) -> None:
        """Tell the modifiers ``domain`` ended (importances consolidate, anchors snapshot).

        They see the routed tensors whole, as one process holds them: FSDP2 shards are gathered
        (a collective, when a modifier consolidates: every rank calls this). ``params`` replaces
        the routed tensors, in :meth:`routed_named_params` order, where a sharded trainer holds
        them elsewhere (ZeRO's fp32 master weights).
        """
        names, own = self.routed_named_params()
        if params is None:
            params = own
            if any(m.consolidates for m in self.modifiers) and any(dt.is_dtensor(p) for p in own):
                params = dt.whole_many([p.detach() for p in own])  # one all-gather
        elif len(params) != len(own):
            raise ValueError(f"end_domain: {len(params)} params for {len(own)} routed tensors")
        for mod in self.modifiers:
            mod.on_domain_end(domain, names, params)

    def supply(self, **extras: Any) -> None:
        """Hand per-step inputs to the modifiers (e.g. ``replay_grads={name: tensor}``)."""
        self._extras.update(extras)

    def supply_grad_norm(self, total_norm: Tensor, params: Iterable[Tensor]) -> None:
        """Let the next ``step()``'s guard use ``total_norm``, the norm of ``params``' gradients as
        they are now (what gradient clipping returned), instead of reading them again.

        The norm is finite exactly when every one of those gradients is, so the guard reads only
        the gradients it does not cover: a parameter with no gradient at this call, or whose
        gradient was replaced or written in place since (``Tensor._version``). ``lora_cl.attach``
        hands over the norm of the Trainer's clipping, which the Trainer computes every step. A
        norm that is not a plain float32, float64 or bfloat16 tensor is not used (float16's range
        would read an overflowing sum of squares of finite gradients as non-finite).
        """
        if (type(total_norm) is not torch.Tensor or total_norm.numel() != 1
                or total_norm.dtype not in (torch.float32, torch.float64, torch.bfloat16)):
            self._given_norm = None
            return
        covered = {id(p): (weakref.ref(p.grad), p.grad._version) for p in params
                   if isinstance(p, Tensor) and p.grad is not None}
        self._given_norm = (total_norm.detach().reshape(()), covered)

    def _split_given(self, entries: list[dict[str, Any]]) -> tuple[Tensor | None, set[int]]:
        """Consume the supplied norm: it and the indices of the entries whose gradient it covers."""
        given, self._given_norm = self._given_norm, None
        if given is None:
            return None, set()
        norm, covered = given
        hit = set()
        for i, e in enumerate(entries):
            rec = covered.get(id(e["key"]))
            grad = e["key"].grad
            if rec is not None and rec[0]() is grad and grad._version == rec[1]:
                hit.add(i)
        return (norm if hit else None), hit

    def routed_named_params(self) -> tuple[list[str], list[Tensor]]:
        """Names and tensors of every parameter in a routed (non-vanilla) group."""
        names: list[str] = []
        params: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            if group["routing"] == "vanilla":
                continue
            names += _param_names(group, gi)
            params += group["params"]
        return names, params

    def rebind_states(self) -> int:
        """Move the states of parameters that were replaced in ``param_groups`` to their
        replacements; return how many moved.

        accelerate's FSDP2 ``prepare`` swaps each parameter in the groups for its sharded DTensor
        but leaves ``optimizer.state`` keyed by the old tensors, so states loaded before it (a
        stream resumed from a domain directory) would be orphaned and the shards start from zero
        moments. A whole state is cut to this rank's shard (no communication). A replacement
        that already has a state (a checkpoint loaded after the swap) keeps it.
        """
        moved = 0
        for group, old in zip(self.param_groups, self._bound, strict=False):
            for p, q in zip(group["params"], old, strict=False):
                if p is q:
                    continue
                state = self.state.pop(q, None)
                if not state or self.state.get(p):
                    continue
                self.state[p] = dt.to_shards(state, p) if dt.is_dtensor(p) else state
                moved += 1
        self._bound = [list(g["params"]) for g in self.param_groups]
        return moved

    def moments(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """fp32 (m, v) of ``p`` in any storage (8-bit is dequantized); None before its first step."""
        return state_moments(self.state.get(p))

    # -- step counters (a device-decided skip is read lazily: no host sync per step) --------------
    def _settle(self) -> None:
        if self._dev_skips is None:
            return
        skipped = int(self._dev_skips.item())
        self._host_skipped += skipped
        self._host_step += self._dev_steps - skipped
        names, checked = self._dev_bad or ([], None)
        self._dev_steps, self._dev_skips, self._dev_bad = 0, None, None
        if skipped:
            shown = ([n for n, x in zip(names, checked.tolist(), strict=True) if not math.isfinite(x)]
                     if checked is not None else [])
            which = (f"; the last one in {len(shown)} tensor(s): {', '.join(shown[:8])}"
                     + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")) if shown else ""
            warnings.warn(f"RoutedAdamW: skipped {skipped} step(s) with non-finite gradients (decided "
                          f"on the device), all optimizer states untouched{which}. Check the loss "
                          "scale, learning rate and input data.", RuntimeWarning, stacklevel=3)

    @property
    def global_step(self) -> int:
        """Steps taken (skipped ones not counted)."""
        self._settle()
        return self._host_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._settle()
        self._host_step = int(value)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by the non-finite guard."""
        self._settle()
        return self._host_skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._settle()
        self._host_skipped = int(value)

    def _wants_8bit(self, p: Tensor) -> bool:
        return self.state_bits == 8 and p.numel() >= self.min_8bit_size

    def metrics(self) -> dict[str, float]:
        """Scalars from every modifier (alpha, overlap, ...) plus step counters."""
        out: dict[str, float] = {"optim/skipped_steps": float(self.skipped_steps)}
        for mod in self.modifiers:
            for key, value in mod.metrics().items():
                out[f"{type(mod).__name__.lower()}/{key}"] = value
        return out

    # -- the step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        entries = self._collect()
        extras, self._extras = self._extras, {}
        if not entries:
            self._given_norm = None
            return loss
        if self._device_decides(entries):
            self._device_step(entries, extras)
            return loss
        step = self.global_step + 1
        routed = self._apply_chain(entries, step, extras)
        # One guard over what reaches the states: every raw gradient and every g~ the chain
        # changed (a replay gradient or a penalty can be non-finite where g is not).
        given, covered = self._split_given(entries)
        if self.nonfinite != "off" and not self._all_finite(entries, given, covered):
            return loss
        if self._hold_commits:
            self._held_commit = True
        else:
            self.commit_modifiers()
        self.global_step = step
        if any(m.additive for m in self.modifiers):
            # additive modifiers: v must cover what m receives (max(g^2, g~^2)); see _update_group
            for e in routed:
                if "mod" in e:
                    e["cover"] = torch.maximum(e["grad"].abs(), e["mod"].abs())

        before = None
        if self.reproject_update and routed:
            before = [e["param"].detach().float().clone() for e in routed]

        for gi, group in enumerate(self.param_groups):
            mine = [e for e in entries if e["group"] == gi]
            if mine:
                self._update_group(group, mine)

        if before is not None:
            self._reproject(routed, before)
        return loss

    def _apply_chain(self, entries: list[dict[str, Any]], step: int, extras: dict[str, Any],
                     m_only: bool = False) -> list[dict[str, Any]]:
        """Run the modifier chain on the routed entries; each g~ that differs from g goes to the
        entry's ``"mod"``. The chain only stages what it observes (GradientModifier.commit), so
        a step the guard skips leaves every modifier's state as it was. Returns the routed entries."""
        routed = [e for e in entries if e["routing"] != "vanilla"]
        if not (routed and self.modifiers):
            return routed
        # FSDP2 shards: the chain sees whole tensors, as in one process (lora_cl.optim.dtensor)
        raw = [e["grad"] for e in routed]
        params = [e["param"] for e in routed]
        sharded = [k for k, e in enumerate(routed) if "dtensor" in e]
        if sharded:  # one all-gather for every gradient and parameter of the step
            whole = dt.whole_many([routed[k]["dtensor"].grad for k in sharded]
                                  + [routed[k]["dtensor"] for k in sharded])
            for j, k in enumerate(sharded):
                raw[k], params[k] = whole[j].float(), whole[len(sharded) + j]
        batch = GradBatch(names=[e["name"] for e in routed], params=params,
                          grads=list(raw), raw=raw, step=step, extras=extras)
        for k, modifier in enumerate(self.modifiers):
            # the last modifier may hand over g~ - g for m alone (GradBatch.m_only) when g~
            # feeds only m and nothing before it changed g
            batch.m_only = (m_only and k == len(self.modifiers) - 1
                            and all(g is r for g, r in zip(batch.grads, raw, strict=True)))
            batch.grads = modifier.apply(batch)
        if batch.m_delta_fns:  # (only when m_only: the device step expands them past its guard)
            self._delta_fns = (routed, batch.m_delta_fns)
        for e, g, g_mod in zip(routed, raw, batch.grads, strict=True):
            if g_mod is not g:
                e["mod"] = _entry_input(g_mod, e)
        for idx, sq in batch.raw_sq_norms:  # squared norms of g the chain computed anyway
            for i, s in zip(idx, sq.unbind(0) if sq.dim() else [sq], strict=True):
                routed[i]["raw_sq_norm"] = s
        return routed

    def _device_decides(self, entries: list[dict[str, Any]]) -> bool:
        """Whether this step's skip-or-step can be decided on the device (no host sync).

        So when nothing needs the decision on the host: ``nonfinite="skip"``, every modifier
        acting on a routed tensor commits on the device (``device_commit``: a projection with a
        fixed or overlap-adaptive strength), none is additive, no update re-projection, torch's
        fused kernel on one device (fp32 or 8-bit states), beta1 >= FUSED_MIN_BETA1 and not
        inside a sharded step.
        """
        if self.nonfinite != "skip" or self.reproject_update or self._hold_commits:
            return False
        if self.modifiers and any(e["routing"] != "vanilla" for e in entries) and not all(
                getattr(m, "device_commit", False) and not m.additive for m in self.modifiers):
            return False
        device = entries[0]["param"].device
        if (self.impl == "reference" or any(e["param"].device != device for e in entries)
                or not fused_kernel_available(device)):
            return False
        return all(float(g["betas"][0]) >= FUSED_MIN_BETA1
                   for gi, g in enumerate(self.param_groups) if any(e["group"] == gi for e in entries))

    def _device_step(self, entries: list[dict[str, Any]], extras: dict[str, Any]) -> None:
        """The step with skip-or-step decided on the device.

        The chain runs as on the host path; ``found_inf`` (any raw gradient or g~ non-finite)
        stays on the device: the modifiers commit masked by it, the first-moment pre-correction
        of tensors whose moments see different gradients is zeroed by it, and torch's fused
        kernel, given it, leaves p, m and v as they are, the step counts put back (as torch's
        own fused AdamW does for its grad scaler). The step counters and the warning naming the
        non-finite tensors are settled when a counter is read.
        """
        m_only = all(self.param_groups[e["group"]]["routing"] == "decoupled"
                     for e in entries if e["routing"] != "vanilla")
        routed = self._apply_chain(entries, self._host_step + self._dev_steps + 1, extras, m_only)
        # g~ of a contracting chain (a projection) is finite where g is: only g is read then
        mods = [] if all(m.contracts for m in self.modifiers) else [e for e in entries if "mod" in e]
        # g whose squared norm the chain computed (a projection's overlap) or whose norm was
        # supplied (gradient clipping's, supply_grad_norm) is not read again
        given, covered = self._split_given(entries)
        known = [e for e in entries if "raw_sq_norm" in e]
        read = [e for i, e in enumerate(entries) if "raw_sq_norm" not in e and i not in covered]
        unread = [e["grad"] for e in read] + [e["mod"] for e in mods]
        norms = torch._foreach_norm(unread) if unread else ()
        device = entries[0]["param"].device
        extra = [] if given is None else [given.to(device, torch.float32, non_blocking=True)]
        checked = torch.stack([*norms, *(e["raw_sq_norm"] for e in known), *extra])
        # x * 0 is 0 for a finite x and NaN for inf or NaN: the sum is 0 or NaN, found_inf 0 or 1
        # (three small ops where isfinite, any and a cast took seven)
        found_inf = dt.max_rank(checked.mul(0).sum().nan_to_num(nan=1.0), entries)  # FSDP2: all skip
        skip = found_inf.bool()
        # the norms of the latest skipped step, whose non-finite tensors are named when a counter
        # is read
        names = ([e["name"] for e in read] + [f"{e['name']} (modified gradient)" for e in mods]
                 + [e["name"] for e in known]
                 + [f"{len(covered)} gradient(s) under the supplied norm" for _ in extra])
        last = self._dev_bad
        self._dev_bad = (names, checked if last is None or last[0] != names
                         else torch.where(skip, checked, last[1]))
        keep = ~skip if routed and self.modifiers else None  # (only the chain reads it)
        if routed:  # (with no routed tensor the chain did not run: nothing staged)
            for modifier in self.modifiers:
                modifier.commit(keep)
        chained, fns = self._delta_fns
        self._delta_fns = ([], [])
        for fn in fns:  # g~ - g handed over by the chain (GradBatch.m_only), zero if skipped
            if self._add_into_moments(fn, chained, keep):
                continue
            for i, d in fn(keep).items():
                chained[i]["m_delta"] = _entry_input(d, chained[i])
        for gi, group in enumerate(self.param_groups):
            mine = [e for e in entries if e["group"] == gi]
            if mine:
                self._device_update(group, mine, found_inf, skip)
        self._dev_steps += 1
        self._dev_skips = found_inf if self._dev_skips is None else self._dev_skips + found_inf

    def _device_update(self, group: dict[str, Any], mine: list[dict[str, Any]], found_inf: Tensor,
                       skip: Tensor) -> None:
        """One param group's update on the device path: p, m and v untouched where ``found_inf``
        is 1. 8-bit states are dequantized a chunk at a time, as on the host path, and their codes
        and block scales written back only where the step stands."""
        m_src, v_src = ROUTINGS[group["routing"]]
        beta1, beta2 = (float(b) for b in group["betas"])
        g_m = [e["grad"] if m_src == "raw" else e.get("mod", e["grad"]) for e in mine]
        g_v = [e["grad"] if v_src == "raw" else e.get("mod", e["grad"]) for e in mine]
        differ = [i for i, (a, b) in enumerate(zip(g_m, g_v, strict=True)) if a is not b]
        # the kernel feeds m from g_v: m += (1-b1)/b1 * (g_m - g_v) lands it on g_m
        # (functional.routed_adamw_fused), zeroed where the step is skipped
        delta: list[Tensor] = []
        if differ:
            if m_src == "mod":  # decoupled: g~ (the chain's own buffer) feeds only m, so
                delta = [g_m[i] for i in differ]  # g~ - g is formed in it: no fresh pages
                torch._foreach_sub_(delta, [g_v[i] for i in differ])
            else:
                delta = list(torch._foreach_sub([g_m[i] for i in differ], [g_v[i] for i in differ]))
        for d in delta:
            d.masked_fill_(skip, 0.0)
        deltas = dict(zip(differ, delta, strict=True))
        # g~ - g handed over by the chain is already zero if the step is skipped
        deltas.update((i, e["m_delta"]) for i, e in enumerate(mine) if "m_delta" in e)
        hyper = dict(lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), found_inf=found_inf)

        pos = {id(e): i for i, e in enumerate(mine)}

        def run(chunk: list[dict[str, Any]], ms: list[Tensor], vs: list[Tensor]) -> None:
            idx = [pos[id(e)] for e in chunk]
            moved = [k for k, i in enumerate(idx) if i in deltas]
            if moved:
                torch._foreach_add_([ms[k] for k in moved], [deltas[idx[k]] for k in moved],
                                    alpha=(1 - beta1) / beta1)
            fused_adamw_step([e["param"] for e in chunk], [g_v[i] for i in idx], ms, vs,
                             [e["state"]["step"] for e in chunk], **hyper)

        _by_moment_storage(mine, run, skip)

    def _add_into_moments(self, fn: Any, chained: list[dict[str, Any]], keep: Tensor) -> bool:
        """m += (1-b1)/b1 (g~ - g) in the chain's own product, where the entry offers it
        (GradBatch.m_delta_fns) for tensors of one param group with local fp32 moments: one pass
        over m, no g~ - g formed. The moments must be rows of one stacked tensor: the first time
        they are not, they are copied into one (their values unchanged; ``state["exp_avg"]`` is
        then a view of it, as after a torch.load of such a state). Returns False where not taken."""
        add_into = getattr(fn, "add_into", None)
        if add_into is None or not fn.whole_group:
            return False
        mine = [chained[i] for i in fn.idx]
        if (not mine or any("dtensor" in e or q8.is_8bit(e["state"]) for e in mine)
                or len({e["group"] for e in mine}) != 1):
            return False
        ms = [e["state"]["exp_avg"] for e in mine]
        m = _stacked_rows(ms)
        if m is None:
            m = torch.stack(ms)
            for e, row in zip(mine, m.unbind(0), strict=True):
                e["state"]["exp_avg"] = row
        beta1 = float(self.param_groups[mine[0]["group"]]["betas"][0])
        add_into(m, keep, (1 - beta1) / beta1)
        return True

    def commit_modifiers(self) -> None:
        """Persist what the modifier chain staged this step (called by ``step`` past the guard)."""
        self._held_commit = False
        for modifier in self.modifiers:
            modifier.commit()

    def _collect(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for gi, group in enumerate(self.param_groups):
            names = _param_names(group, gi)
            for p, name in zip(group["params"], names, strict=True):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RoutedAdamW does not support sparse gradients")
                state = self.state[p]
                sharded = dt.is_dtensor(p)
                if "exp_avg" not in state and not q8.is_8bit(state):  # (a state may hold only extras)
                    if sharded:
                        dt.check_param(p, reproject_update=self.reproject_update)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                    if self._wants_8bit(p):  # (on a DTensor: blockwise over each local shard)
                        state.update(dt.init_8bit(p) if sharded else q8.init_8bit(p))
                    else:
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                            memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                               memory_format=torch.preserve_format)
                grad = p.grad.to_local() if sharded else p.grad
                grad = grad if grad.dtype == torch.float32 else grad.float()
                entry = dict(group=gi, name=name, param=p.to_local() if sharded else p,
                             key=p,
                             grad=grad, routing=group["routing"], state=state)
                if sharded:  # FSDP2: step the local shards (lora_cl.optim.dtensor)
                    entry["dtensor"] = p
                    entry["state"] = dt.local_state(state, p)
                entries.append(entry)
        return entries

    def _all_finite(self, entries: list[dict[str, Any]], given: Tensor | None = None,
                    covered: set[int] | frozenset[int] = frozenset()) -> bool:
        checked = [(e["name"], "gradient", e["grad"]) for i, e in enumerate(entries) if i not in covered]
        checked += [(e["name"], "modified gradient", e["mod"]) for e in entries if "mod" in e]
        norms = list(torch._foreach_norm([t for _, _, t in checked])) if checked else []
        if given is not None:
            checked.append((f"{len(covered)} gradient(s) under the supplied norm", "gradient", given))
            norms.append(given)
        device = norms[0].device
        same = all(n.device == device for n in norms)
        finite = torch.stack(norms if same else [n.to(device) for n in norms]).isfinite().all()
        if not bool(dt.any_rank(~finite, entries)):  # FSDP2: every rank decides the same
            return True
        bad = [f"{name} ({what})" for (name, what, _), n in zip(checked, norms, strict=True)
               if not torch.isfinite(n)] or ["(on another rank)"]
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raw_bad = any(b.endswith("(gradient)") for b in bad)
        cause = ("Check the loss scale, learning rate and input data." if raw_bad else
                 "The modifier chain made it (a replay gradient, an EWC penalty or its Fisher).")
        message = f"non-finite values in {len(bad)} tensor(s): {shown}. {cause}"
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"RoutedAdamW: {message}")
        self.skipped_steps += 1
        warnings.warn(f"RoutedAdamW: skipped step, all optimizer and modifier states untouched: "
                      f"{message}", RuntimeWarning, stacklevel=3)
        return False

    def _update_group(self, group: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        m_src, v_src = ROUTINGS[group["routing"]]
        beta1, beta2 = group["betas"]
        use_fused = self.impl == "fused" or (
            self.impl == "auto" and all(fused_kernel_available(e["param"].device) for e in entries)
        )
        fn = routed_adamw_fused if use_fused else routed_adamw_reference
        hyper = dict(lr=_as_float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))

        # decoupled + additive modifiers: v on max(g^2, g~^2) ("cover"), else the routing's source
        v_raw = "cover" if m_src == "mod" else "grad"

        def run(chunk: list[dict[str, Any]], ms: list[Tensor], vs: list[Tensor]) -> None:
            fn([e["param"] for e in chunk],
               [e["grad"] if m_src == "raw" else e.get("mod", e["grad"]) for e in chunk],
               [e.get(v_raw, e["grad"]) if v_src == "raw" else e.get("mod", e["grad"])
                for e in chunk],
               ms, vs, [e["state"]["step"] for e in chunk], **hyper)

        _by_moment_storage(entries, run)

    def _reproject(self, routed: list[dict[str, Any]], before: list[Tensor]) -> None:
        names = [e["name"] for e in routed]
        deltas = [e["param"].detach().float() - b for e, b in zip(routed, before, strict=True)]
        projected = deltas
        for modifier in self.modifiers:
            project = getattr(modifier, "project_update", None)
            if project is not None:
                projected = project(names, projected)
        for e, b, d_old, d_new in zip(routed, before, deltas, projected, strict=True):
            if d_new is not d_old:
                e["param"].copy_(b + d_new)

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lora_cl"] = self.extra_state_dict()
        return state

    def extra_state_dict(self) -> dict[str, Any]:
        """What RoutedAdamW keeps beyond AdamW's state: counters and the modifier chain (bank,
        strength EMAs, buffered rows); ``state_dict()["lora_cl"]``."""
        return {
            "format": 1,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "state_bits": self.state_bits,
            "min_8bit_size": self.min_8bit_size,
            "modifiers": [
                {"type": type(m).__name__, "state": m.state_dict()} for m in self.modifiers
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a RoutedAdamW checkpoint, or a ``torch.optim.AdamW`` one (its m, v and step).

        Refused, before anything is loaded: a checkpoint whose groups were routed differently
        from this optimizer's, a different modifier chain or state layout, and AdamW options
        RoutedAdamW does not implement (amsgrad, maximize). An AdamW checkpoint's groups take
        this optimizer's routing.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("lora_cl", None)
        state_dict["param_groups"] = self._checked_groups(state_dict.get("param_groups", []))
        self._check_state_bits(state_dict, extra)
        super().load_state_dict(state_dict)
        self._restore_states(state_dict)
        if extra is not None:
            self.load_extra_state_dict(extra)

    def load_extra_state_dict(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` saved (counters, the modifier chain)."""
        saved = extra["modifiers"]
        if [s["type"] for s in saved] != [type(m).__name__ for m in self.modifiers]:
            raise ValueError(
                "RoutedAdamW.load_state_dict: the checkpoint's modifier chain "
                f"{[s['type'] for s in saved]} differs from this optimizer's "
                f"{[type(m).__name__ for m in self.modifiers]}; build the optimizer with the "
                "same method/modifiers before resuming."
            )
        for mod, s in zip(self.modifiers, saved, strict=True):
            mod.load_state_dict(s["state"])
        self.global_step = int(extra["global_step"])
        self.skipped_steps = int(extra["skipped_steps"])

    def _checked_groups(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for gi, (group, old) in enumerate(zip(self.param_groups, saved, strict=False)):
            old = dict(old)
            if "routing" not in old:  # a torch.optim.AdamW checkpoint
                options = {key: old.pop(key) for key in _ADAMW_ONLY if key in old}
                if not options.get("decoupled_weight_decay", True) and old.get("weight_decay"):
                    raise ValueError(f"RoutedAdamW.load_state_dict: the checkpoint's param group {gi} "
                                     "is torch.optim.Adam with L2 weight decay, not AdamW's "
                                     "decoupled decay; resume it with torch.optim.Adam")
                for key in ("amsgrad", "maximize"):
                    if options.get(key):
                        raise ValueError(f"RoutedAdamW.load_state_dict: the checkpoint's param group "
                                         f"{gi} has {key}=True, which RoutedAdamW does not implement; "
                                         f"resume it with torch.optim.AdamW")
                old["routing"] = group["routing"]
            elif old["routing"] != group["routing"]:
                raise ValueError(f"RoutedAdamW.load_state_dict: the checkpoint's param group {gi} "
                                 f"was routed {old['routing']!r} but this optimizer's is "
                                 f"{group['routing']!r}; build it with routing={old['routing']!r} "
                                 "(the checkpoint's method) to resume")
            out.append(old)
        return out + list(saved[len(out):])

    def _saved_states(self, state_dict: dict[str, Any]) -> list[tuple[Tensor, dict[str, Any]]]:
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        pairs = [(p, state_dict["state"].get(pid)) for pid, p in zip(saved_ids, params, strict=False)]
        return [(p, saved) for p, saved in pairs if saved]

    def _check_state_bits(self, state_dict: dict[str, Any], extra: dict[str, Any] | None) -> None:
        # Before anything is loaded, so a refused checkpoint leaves this optimizer untouched.
        mismatch = q8.layout_mismatch(self._saved_states(state_dict), self._wants_8bit,
                                      (extra or {}).get("state_bits"), self.state_bits)
        if mismatch:
            raise ValueError(f"RoutedAdamW.load_state_dict: {mismatch}, but this optimizer was built "
                             f"with state_bits={self.state_bits}, min_8bit_size={self.min_8bit_size}; "
                             "build it with the checkpoint's state_bits (make_optimizer(..., "
                             "state_bits=...)) to resume.")

    def _restore_states(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded float states to the param dtype; ours stay fp32 (8-bit codes
        # stay uint8), and the step lives on the param's device, where the fused kernel reads it.
        # Nested states (ZeRO's per-tensor list) come back as saved, on the param's device.
        # A whole state loaded onto an FSDP2 (DTensor) parameter is cut to its shard.
        for p, saved in self._saved_states(state_dict):
            restored: dict[str, Any] = {}
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    dtype = torch.uint8 if value.dtype == torch.uint8 else torch.float32
                    restored[key] = value.to(device=p.device, dtype=dtype, copy=True)
                elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
                    restored[key] = [{k: t.to(device=p.device, copy=True) if isinstance(t, Tensor) else t
                                      for k, t in v.items()} for v in value]
            self.state[p].update(dt.to_shards(restored, p) if dt.is_dtensor(p) else restored)


def _by_moment_storage(entries: list[dict[str, Any]],
                       run: Callable[[list[dict[str, Any]], list[Tensor], list[Tensor]], None],
                       skip: Tensor | None = None) -> None:
    """``run(chunk, ms, vs)`` on fp32 moments: once for the entries with fp32 states, and for 8-bit
    states once per chunk, dequantized together, the same update on fp32 copies, then requantized
    (where the 0-d ``skip`` is True the codes and scales are kept as they were). Chunks bound the
    transient fp32 memory (8 B/element) while keeping the fused kernel's batching."""
    full = [e for e in entries if not q8.is_8bit(e["state"])]
    if full:
        run(full, [e["state"]["exp_avg"] for e in full], [e["state"]["exp_avg_sq"] for e in full])
    small = [e for e in entries if q8.is_8bit(e["state"])]
    for chunk in q8.chunks(small, [e["param"].numel() for e in small]):
        if len({e["param"].device for e in chunk}) == 1:  # one call per moment for the chunk
            flat = q8.Chunk8bit([e["state"] for e in chunk])
            run(chunk, flat.m, flat.v)
            flat.requantize_(skip)
            continue
        if skip is not None:  # (the device-decided step runs on one device only: _device_decides)
            raise RuntimeError("RoutedAdamW: a device-decided step over several devices")
        moments = [q8.dequantize(e["state"]) for e in chunk]  # (a model split over devices)
        run(chunk, [m for m, _ in moments], [v for _, v in moments])
        for e, (m, v) in zip(chunk, moments, strict=True):
            q8.requantize_(e["state"], m, v)


def state_moments(state: dict[str, Any] | None) -> tuple[Tensor, Tensor] | None:
    """fp32 (m, v) of one per-tensor optimizer state in any storage (8-bit is dequantized, FSDP2
    shards all-gathered); None for a state without moments of its own (none yet, extras only, or
    ZeRO's per-tensor list)."""
    if not state:
        return None
    if q8.is_8bit(state) and dt.is_dtensor(state["state1"]):  # FSDP2: dequantize the shards
        return dt.whole_moments_8bit(state)
    if q8.is_8bit(state):
        return q8.dequantize(state)
    if "exp_avg" not in state:
        return None
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if dt.is_dtensor(m):  # FSDP2: whole, as one process holds them (collective: every rank calls)
        return dt.whole(m), dt.whole(v)
    return m, v


def _as_state_input(g: Tensor, entry: dict[str, Any]) -> Tensor:
    """A modifier's g~ as the states take it: the parameter's shape, fp32, on its device."""
    p = entry["param"]
    if g.shape != p.shape:
        raise ValueError(f"RoutedAdamW: the modifier chain returned shape {tuple(g.shape)} for "
                         f"{entry['name']!r}, whose gradient has shape {tuple(p.shape)}; a modifier "
                         "must return one tensor of the gradient's shape per routed tensor")
    if g.dtype != torch.float32 or g.device != p.device:
        return g.to(device=p.device, dtype=torch.float32)
    return g


def _entry_input(g: Tensor, entry: dict[str, Any]) -> Tensor:
    """A whole-tensor result of the chain (g~ or g~ - g) as the entry's states take it: checked
    against the whole parameter and, for an FSDP2 shard, cut to this rank's local shard."""
    if "dtensor" not in entry:
        return _as_state_input(g, entry)
    _as_state_input(g, {**entry, "param": entry["dtensor"]})  # (the shape check)
    return _as_state_input(dt.shard_like(g.float(), entry["dtensor"]), entry)


def _stacked_rows(ts: list[Tensor]) -> Tensor | None:
    """The (n, *shape) tensor whose rows are ``ts`` when they lie back to back in one storage
    (contiguous, same shape, dtype and device), else None."""
    first = ts[0]
    if not first.is_contiguous():
        return None
    n, ptr, off = first.numel(), first.untyped_storage().data_ptr(), first.storage_offset()
    for k, t in enumerate(ts):
        if (t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
                or not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr
                or t.storage_offset() != off + k * n):
            return None
    return first.as_strided((len(ts), *first.shape), (n, *first.stride()), off)


def _check_routing(routing: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(
            f"RoutedAdamW: unknown routing {routing!r}; choose one of {sorted(ROUTINGS)}"
        )


#: torch.optim.AdamW group options; False (their default) is what RoutedAdamW computes.
_ADAMW_ONLY = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
               "decoupled_weight_decay")
#: group keys torch or the HF stack set besides ours (LR schedulers write ``initial_lr``).
_FOREIGN_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr"})


def _check_group_keys(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a param-group key RoutedAdamW would silently ignore (``names``, ``amsgrad``, ...)."""
    known = set(defaults) | _FOREIGN_GROUP_KEYS
    for key in group:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"RoutedAdamW: unknown param-group key {key!r}{hint} (known: "
                             f"{', '.join(sorted(known))})")


def _param_names(group: dict[str, Any], gi: int) -> list[str]:
    """The group's tensor names ('param_names'), or ``group<gi>.param<pi>`` where it has none."""
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return names
    return [names[pi] if names is not None and pi < len(names) else f"group{gi}.param{pi}"
            for pi in range(len(group["params"]))]


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)
