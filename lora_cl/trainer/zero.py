"""Routed steps under DeepSpeed ZeRO: g~ from the full LoRA gradient, this rank's fragment back.

From stage 1 up DeepSpeed steps its client optimizer on one flat fp32 partition per param group
and rank, cut across tensor boundaries. Projection g~ = g - alpha g U U^T needs the 2-D gradient,
so :class:`ZeroRoutedStep` takes the client's place inside DeepSpeed's ZeRO-1/2 optimizer and, per
group: rebuilds the full fp32 LoRA tensors p, g, m, v from every rank's fragment (DeepSpeed's
per-parameter ``_hp_mapping``; one all-reduce of zero-filled buffers, exact since fragments are
disjoint), runs the unchanged :meth:`RoutedAdamW.step` on them (every rank the same update, as in
a single process), then writes this rank's fragment of p, m and v back into the partition, from
where DeepSpeed copies and all-gathers the weights as usual. States stay in DeepSpeed's flat
layout during a domain, so ZeRO checkpoints save and resume with no change; between domains
(one engine per domain) :func:`release_zero` and :meth:`ZeroRoutedStep.adopt` carry them over
in per-tensor layout.

ZeRO-3 partitions each parameter on its own; :class:`~lora_cl.trainer.zero3.Zero3RoutedStep` is
the same step on that layout, with the same hand-over between domains' engines (the last engine's
hooks retired by :func:`retire_zero3`, the LoRA tensors gathered for the domain's end by
:func:`~lora_cl.trainer.zero3.gathered_trainable`).

Stages and options that cannot keep the single-process math refuse at start-up
(:class:`ZeroRoutingError`, raised from :func:`route_under_zero`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lora_cl.optim import RoutedAdamW

SUPPORTED = ("deepspeed_configs/zero2.json (ZeRO-2; ZeRO-1 works too), deepspeed_configs/zero3.json "
             "(ZeRO-3), plain DDP (torchrun without training.deepspeed) or ZeRO stage 0 without bf16/fp16")


def zero_stage_of(deepspeed_config: str | None) -> int | None:
    """The ZeRO stage of a recipe's ``training.deepspeed`` (None without one, or when the file is
    missing or broken: that is reported where the Trainer reads it)."""
    if not deepspeed_config:
        return None
    from lora_cl.dsconfig import read_zero

    try:
        return read_zero(deepspeed_config).stage
    except (OSError, ValueError):
        return None


#: Per-tensor optimizer-state key of the fp32 master weights of low-precision (bf16/fp16) LoRA
#: tensors between two ZeRO engines of a stream.
MASTER = "lora_cl_fp32_master"


#: Flat-partition state key of an 8-bit optimizer's states under ZeRO-1/2: one full per-tensor state
#: (bitsandbytes-format 8-bit m and v, or fp32 ones for tensors below min_8bit_size) per LoRA
#: tensor of the group, in DeepSpeed's tensor order, replicated on every rank. A list, so DeepSpeed
#: saves and restores it as it is (it trims and pads only tensor states, to its partitions).
PER_TENSOR = "lora_cl_per_tensor_states"


def zero_masters(optimizer: RoutedAdamW) -> list[Tensor] | None:
    """The fp32 master weights of the routed tensors, in ``routed_named_params`` order, that
    :func:`release_zero` left in their states (low-precision LoRA tensors under ZeRO); None when
    the tensors themselves are the weights (fp32, or no ZeRO)."""
    _, params = optimizer.routed_named_params()
    masters = [optimizer.state.get(p, {}).get(MASTER) for p in params]
    return masters if params and all(m is not None for m in masters) else None


class ZeroRoutingError(RuntimeError):
    """A DeepSpeed stage or option under which lora-cl cannot route with single-process math."""


def zero_stage12(wrapped: Any) -> Any:
    """DeepSpeed's ZeRO-1/2 optimizer in ``wrapped``'s chain of wrappers, or None."""
    return next((w for w in _wrappers(wrapped)
                 if type(w).__module__ == "deepspeed.runtime.zero.stage_1_and_2"), None)


def zero_stage3(wrapped: Any) -> Any:
    """DeepSpeed's ZeRO-3 optimizer in ``wrapped``'s chain of wrappers, or None."""
    return next((w for w in _wrappers(wrapped)
                 if type(w).__module__ == "deepspeed.runtime.zero.stage3"), None)


def route_under_zero(wrapped: Any, optimizer: RoutedAdamW) -> bool:
    """Put :class:`ZeroRoutedStep` (ZeRO-1/2) or :class:`~lora_cl.trainer.zero3.Zero3RoutedStep`
    (ZeRO-3) in the DeepSpeed optimizer that steps ``optimizer``.

    ``wrapped`` is what the Trainer steps (accelerate's wrapper). Returns False when no DeepSpeed
    optimizer wraps ``optimizer`` (the caller decides), True once routing runs on full tensors;
    raises :class:`ZeroRoutingError` for DeepSpeed's stage-0 bf16/fp16 optimizers and for options
    or layouts under which the modifiers could not see every full LoRA tensor of a step together.
    """
    from lora_cl.trainer.zero3 import Zero3RoutedStep, check_stage3_layout

    chain = _wrappers(wrapped)
    if any(isinstance(w, ZeroRoutedStep) for w in chain):
        return True
    zero, stage3 = zero_stage12(wrapped), zero_stage3(wrapped)
    if stage3 is not None:
        where = "lora-cl under DeepSpeed ZeRO-3"
        _check_supported(optimizer, where)
        check_stage3_layout(optimizer, stage3, where)
        zero, step_cls = stage3, Zero3RoutedStep
    elif zero is not None:
        where = "lora-cl under DeepSpeed ZeRO-1/2"
        _check_supported(optimizer, where)
        _check_stage12_layout(optimizer, zero, where)
        step_cls = ZeroRoutedStep
    elif any(type(w).__module__.startswith("deepspeed") for w in chain):
        names = sorted({type(w).__name__ for w in chain if type(w).__module__.startswith("deepspeed")})
        raise ZeroRoutingError(
            f"lora-cl: DeepSpeed's {', '.join(names)} (stage 0 with bf16/fp16) flattens the LoRA "
            "tensors into one fp32 buffer that routing cannot see as 2-D tensors. Use "
            f"{SUPPORTED} (ZeRO-2 with bf16 routes on its fp32 master weights). See "
            "docs/deepspeed.md, 'Routing under ZeRO'")
    else:
        return False
    routed = step_cls(optimizer, zero)
    routed.adopt()
    zero.optimizer = routed
    return True


def retire_zero3(previous: Any, wrapped: Any) -> Any:
    """At a domain's start: retire the last domain's ZeRO-3 optimizer if a new engine replaced it.

    A stream runs one DeepSpeed engine per domain on one model. Stage 3's gradient hooks and module
    hooks stay on the shared parameters after the engine is done, and the next engine's backward
    failed inside them (``param.grad`` None in ``__reduce_and_partition_ipg_grads``, measured with
    DeepSpeed 0.19); DeepSpeed's own ``destroy()`` removes exactly those hooks (accelerate's
    ``free_memory`` calls it too). Returns the current ZeRO-3 optimizer (None without ZeRO-3).
    """
    current = zero_stage3(wrapped)
    if previous is not None and previous is not current:
        previous.destroy()
    return current


def release_zero(wrapped: Any) -> bool:
    """At a domain's end: the stream's RoutedAdamW back in per-tensor layout, if ZeRO routed it.

    A stream runs one DeepSpeed engine per domain on one optimizer; each engine re-flattens the
    optimizer's param groups. Releasing gives the groups back their LoRA tensors and the states
    back as full per-tensor m and v (every rank; one all-reduce), so the domain's end (bases,
    snapshots, ``optimizer.pt``) sees what a single process sees, and the next engine's
    :meth:`ZeroRoutedStep.adopt` cuts them into its partitions again. Returns False when no
    :class:`ZeroRoutedStep` is in ``wrapped``'s chain.
    """
    for w in _wrappers(wrapped):
        if isinstance(w, ZeroRoutedStep):
            w.release()
            return True
    return False


def _check_supported(optimizer: RoutedAdamW, where: str) -> None:
    routed = [g for g in optimizer.param_groups if g["routing"] != "vanilla"]
    if len(routed) > 1:
        raise ZeroRoutingError(f"{where}: {len(routed)} routed param groups; DeepSpeed steps one group "
                               "at a time, so the modifiers could not see every LoRA tensor of a step "
                               "together. Put all LoRA tensors in one group (lora_cl.param_groups)")


def _check_stage12_layout(optimizer: RoutedAdamW, zero: Any, where: str) -> None:
    for i, group in enumerate(optimizer.param_groups):
        names = {zero.param_names.get(lp) for lp in zero.bit16_groups[i]}
        if (len(group["params"]) != 1 or group["params"][0] is not zero.single_partition_of_fp32_groups[i]
                or ("param_names" in group and names != set(group["param_names"]))):
            raise ZeroRoutingError(f"{where}: param group {i} is not one flat fp32 partition of the "
                                   f"group's named tensors (DeepSpeed {_ds_version()} layout not "
                                   "recognised)")


class ZeroRoutedStep:
    """The client optimizer DeepSpeed ZeRO-1/2 steps: :class:`RoutedAdamW` on full LoRA tensors.

    Everything but ``step`` is the RoutedAdamW's own (param groups, flat-layout state, state_dict),
    so checkpoints are the ones DeepSpeed writes for the bare optimizer. fp32 moments live in
    DeepSpeed's flat partitions (each rank its slice); an optimizer with ``state_bits=8`` keeps
    per-tensor states instead (:data:`PER_TENSOR`), whole and replicated: 8-bit blocks cannot be
    cut at partition boundaries, and every rank computes the full routed update anyway, so the
    replicas stay identical with no extra communication (2 bytes a LoRA parameter per rank).
    """

    def __init__(self, optimizer: RoutedAdamW, zero: Any) -> None:
        self.optimizer = optimizer
        self._zero = zero
        self._pending: list[tuple[int, Any]] | None = None  # this ZeRO step's deferred writes
        self._before = (optimizer.global_step, optimizer.skipped_steps)
        self._skip = False

    # DeepSpeed reads and swaps these on its client optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "_zero"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def adopt(self) -> None:
        """Per-tensor states left by :meth:`release` (or loaded from ``optimizer.pt``) into this
        engine's flat partitions; a state DeepSpeed already loaded from its checkpoint wins."""
        opt = self.optimizer
        for index in range(len(opt.param_groups)):
            flat, lps = self._flats()[index], self._tensors(index)
            per = [opt.state.pop(lp, None) or {} for lp in lps]
            if opt.state.get(flat):
                continue
            if self.per_tensor:
                self._adopt_per_tensor(index, flat, lps, per)
                continue
            moments = ["exp_avg" in st for st in per]
            if any(moments) and not all(moments):
                raise ZeroRoutingError("lora-cl under DeepSpeed ZeRO-1/2: some LoRA tensors of param group "
                                       f"{index} have optimizer states and some do not; resume from "
                                       "a domain directory or checkpoint written by lora-cl")
            keys = ["exp_avg", "exp_avg_sq"] if all(moments) else []
            if keys:
                state = opt.state[flat]
                state["step"] = per[0]["step"].detach().to(device=flat.device, dtype=torch.float32).clone()
                for key in keys:
                    state[key] = torch.zeros_like(flat, dtype=torch.float32)
            masters = all(MASTER in st for st in per)  # fp32 master weights over the domain boundary
            if not keys and not masters:
                continue
            pairs = [(opt.state[flat][k], [st[k] for st in per]) for k in keys]
            if masters:
                pairs.append((flat.data, [st[MASTER] for st in per]))
            self._write_own(index, pairs)

    @property
    def per_tensor(self) -> bool:
        """Whether the states are per tensor and replicated (8-bit) rather than flat partitions."""
        return getattr(self.optimizer, "state_bits", 32) == 8

    def _adopt_per_tensor(self, index: int, flat: Tensor, lps: list[Tensor],
                          per: list[dict[str, Any]]) -> None:
        opt = self.optimizer
        have = [bool(st.get("step") is not None and ("state1" in st or "exp_avg" in st)) for st in per]
        if any(have) and not all(have):
            raise ZeroRoutingError("lora-cl under DeepSpeed ZeRO-1/2: some LoRA tensors of param group "
                                   f"{index} have optimizer states and some do not; resume from a "
                                   "domain directory or checkpoint written by lora-cl")
        if all(have):
            opt.state[flat]["step"] = per[0]["step"].detach().to(device=flat.device).clone()
            opt.state[flat][PER_TENSOR] = [{k: v for k, v in st.items() if k != MASTER} for st in per]
        if all(MASTER in st for st in per):  # fp32 master weights over the domain boundary
            self._write_own(index, [(flat.data, [st[MASTER] for st in per])])

    @torch.no_grad()
    def release(self) -> None:
        """This engine's flat states back to per-tensor layout (see :func:`release_zero`)."""
        opt = self.optimizer
        groups = []
        for index, group in enumerate(opt.param_groups):
            flat, lps = self._flats()[index], self._tensors(index)
            state = opt.state.pop(flat, None) or {}
            per_tensor = state.pop(PER_TENSOR, None)
            if per_tensor is not None:  # replicated whole: each tensor's state as it is
                for lp, st in zip(lps, per_tensor, strict=True):
                    opt.state[lp].update(st)
                state = {}
            keys = ["exp_avg", "exp_avg_sq"] if state else []
            low_precision = any(lp.dtype != torch.float32 for lp in lps)
            if low_precision:
                keys.append("param")
            if keys:
                sources = {"param": flat.detach(), **{k: state[k] for k in keys if k != "param"}}
                full = self._full(index, sources, keys)
                for j, lp in enumerate(lps):
                    st = opt.state[lp]
                    if state:
                        st["step"] = state["step"].clone()
                        st["exp_avg"], st["exp_avg_sq"] = full["exp_avg"][j], full["exp_avg_sq"][j]
                    if low_precision:
                        st[MASTER] = full["param"][j]
            groups.append({**group, "params": lps, "param_names": [self._zero.param_names[lp] for lp in lps]})
        opt.param_groups = groups
        self._zero.optimizer = opt  # this engine is done: nothing routes through it any more

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One param group of a ZeRO step (DeepSpeed calls this once per group, in order).

        Each group steps on gathered full copies; nothing is written back until the last group
        of the ZeRO step, so the non-finite guard decides for the whole optimizer as in one
        process: one group's NaN (a raw gradient, a replay gradient) skips every group, and the
        modifiers commit once, only when nothing was skipped.
        """
        if closure is not None:
            raise RuntimeError("ZeroRoutedStep: DeepSpeed does not pass a closure")
        flats = self._flats()
        for group in list(self.optimizer.param_groups):  # DeepSpeed passes one group per call
            if not group["params"]:  # ZeRO-3 lists every group, with only the stepped one's partition
                continue
            index = next(i for i, f in enumerate(flats) if f is group["params"][0])
            if index == 0 or self._pending is None:
                self._begin()
            try:
                self._step_group(index, group)
            except BaseException:  # nothing of this ZeRO step was written: leave it all as it was
                self._pending, self.optimizer._hold_commits = None, False
                self.optimizer.global_step, self.optimizer.skipped_steps = self._before
                raise
            if index == len(flats) - 1:
                self._finish()

    def _begin(self) -> None:
        opt = self.optimizer
        self._pending = []
        self._before = (opt.global_step, opt.skipped_steps)
        self._skip = False
        opt._hold_commits, opt._held_commit = True, False

    def _finish(self) -> None:
        opt = self.optimizer
        pending, self._pending = self._pending or [], None
        before_step, before_skipped = self._before
        opt._hold_commits = False
        if self._skip:  # every state untouched, the step counted once, as in one process
            opt._held_commit = False
            opt.global_step, opt.skipped_steps = before_step, before_skipped + 1
            return
        if opt._held_commit:
            opt.commit_modifiers()
        opt.global_step = before_step + 1
        for index, write in pending:
            write()
            # DeepSpeed copied this group's fp32 partition into its bit16 one right after the
            # group's step, before this write: copy again (its all-gather comes after the loop)
            self._recopy(index)

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        opt = self.optimizer
        flat = group["params"][0]
        if flat.grad is None or self._skip:
            return
        lps = self._tensors(index)
        state = opt.state.get(flat) or {}
        per_tensor = state.get(PER_TENSOR)
        keys = ["param", "grad"] + (["exp_avg", "exp_avg_sq"] if state and per_tensor is None
                                    and not self.per_tensor else [])
        sources = {"param": flat.detach(), "grad": flat.grad, **{k: state[k] for k in keys[2:]}}
        full = self._full(index, sources, keys)

        params = [full["param"][j] for j in range(len(lps))]
        for p, g in zip(params, full["grad"], strict=True):
            p.grad = g
        if per_tensor is not None:  # copies: a skipped or failed step leaves the saved states as they were
            for p, st in zip(params, per_tensor, strict=True):  # (a loaded checkpoint may sit on the CPU)
                opt.state[p] = {k: v.to(device=p.device, copy=True) for k, v in st.items()}
        elif state and "exp_avg" in state:
            for j, p in enumerate(params):
                opt.state[p] = {"step": state["step"].clone(), "exp_avg": full["exp_avg"][j],
                                "exp_avg_sq": full["exp_avg_sq"][j]}
        # every group of one ZeRO step steps with the same step number
        opt.global_step = self._before[0]
        skipped = opt.skipped_steps
        # DeepSpeed may hold a group's tensors in another order than the group's param_names.
        view = {**group, "params": params, "param_names": [self._zero.param_names[lp] for lp in lps]}
        listed = opt.param_groups
        try:
            opt.param_groups = [view]
            RoutedAdamW.step(opt)
        finally:
            opt.param_groups = listed
            states = [opt.state.pop(p, None) for p in params]
        if opt.skipped_steps != skipped:
            self._skip = True  # non-finite: the whole ZeRO step is skipped (see step)
            return

        def write() -> None:
            if self.per_tensor:
                st = opt.state[flat]
                st["step"] = states[0]["step"].clone()
                st[PER_TENSOR] = states
                self._write_own(index, [(flat, params)])
                return
            st = opt.state.get(flat) or {}
            if not st:
                st = opt.state[flat]
                st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device)
                st["exp_avg"] = torch.zeros_like(flat, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(flat, dtype=torch.float32)
            st["step"].copy_(states[0]["step"])
            self._write_own(index, [(flat, params)] + [(st[k], [s[k] for s in states])
                                                       for k in ("exp_avg", "exp_avg_sq")])

        self._pending.append((index, write))

    # -- DeepSpeed's layout: ZeRO-1/2's here, ZeRO-3's in lora_cl.trainer.zero3 ------------------
    def _flats(self) -> list[Tensor]:
        """The flat fp32 partition of each param group (what DeepSpeed hands this optimizer)."""
        return self._zero.single_partition_of_fp32_groups

    def _tensors(self, index: int) -> list[Tensor]:
        """The model's tensors of group ``index``, in DeepSpeed's order."""
        return list(self._zero.bit16_groups[index])

    def _full(self, index: int, sources: dict[str, Tensor], keys: list[str]) -> dict[str, list[Tensor]]:
        """Full fp32 tensors of group ``index`` for each key, from every rank's partition."""
        return _gather_full(self._tensors(index), fragments(self._zero, index), sources, keys,
                            self._zero.real_dp_process_group[index])

    def _write_own(self, index: int, pairs: list[tuple[Tensor, list[Tensor]]]) -> None:
        """This rank's share of full per-tensor values into flat partitions (inverse of _full)."""
        _scatter_own(self._tensors(index), fragments(self._zero, index), pairs)

    def _recopy(self, index: int) -> None:
        """The fp32 partition of group ``index`` into the low-precision one DeepSpeed gathers from."""
        from deepspeed import comm as dist

        zero = self._zero
        rank = dist.get_rank(group=zero.real_dp_process_group[index])
        zero.parallel_partitioned_bit16_groups[index][rank].data.copy_(
            zero.single_partition_of_fp32_groups[index].data)


def fragments(zero: Any, index: int) -> list[tuple[Tensor, int, int, int]]:
    """(tensor, start, end, start in this rank's partition) of every tensor of group ``index``.

    Computed from the flat layout itself (round-robin order, per-tensor alignment offsets):
    DeepSpeed 0.19's ``_hp_mapping`` assumes the unreordered order, which is wrong under
    ``round_robin_gradients`` (set in zero2.json).
    """
    from deepspeed import comm as dist

    group = zero.real_dp_process_group[index]
    size = zero.bit16_groups_flat[index].numel() // dist.get_world_size(group=group)
    begin = dist.get_rank(group=group) * size
    tensors = zero.round_robin_bit16_groups[index]
    offsets = getattr(zero, "round_robin_bit16_offsets", None)
    if offsets is not None:
        offsets = offsets[index]
    else:  # older DeepSpeed: no per-tensor alignment padding
        offsets = [sum(t.numel() for t in tensors[:k]) for k in range(len(tensors))]
    out = []
    for lp, off in zip(tensors, offsets, strict=True):
        lo, hi = max(off, begin), min(off + lp.numel(), begin + size)
        if lo < hi:
            out.append((lp, lo - off, hi - off, lo - begin))
    return out


def _gather_full(lps: list[Tensor], frags: list[tuple[Tensor, int, int, int]],
                 sources: dict[str, Tensor], keys: list[str], group: Any) -> dict[str, list[Tensor]]:
    """Full fp32 tensors shaped like ``lps`` for each key, from every rank's partition fragment."""
    from deepspeed import comm as dist

    sizes = [lp.numel() for lp in lps]
    starts = dict(zip((id(lp) for lp in lps), _cumsum(sizes), strict=True))
    buf = torch.zeros(len(keys), sum(sizes), dtype=torch.float32, device=sources["param"].device)
    for lp, lo, hi, hp in frags:
        at = starts[id(lp)]
        for row, key in enumerate(keys):
            buf[row, at + lo:at + hi] = sources[key].view(-1)[hp:hp + hi - lo]
    dist.all_reduce(buf, group=group)  # disjoint fragments + zeros: the sum is exact
    out: dict[str, list[Tensor]] = {}
    for row, key in enumerate(keys):
        pieces = torch.split(buf[row], sizes)
        out[key] = [t.view(lp.shape).clone() for t, lp in zip(pieces, lps, strict=True)]
    return out


def _scatter_own(lps: list[Tensor], frags: list[tuple[Tensor, int, int, int]],
                 pairs: list[tuple[Tensor, list[Tensor]]]) -> None:
    """This rank's fragments of full per-tensor values into its flat partitions (the inverse of
    :func:`_gather_full`): for each (flat target, one full tensor per ``lps`` entry)."""
    position = {id(lp): j for j, lp in enumerate(lps)}
    for lp, lo, hi, hp in frags:
        j = position[id(lp)]
        for dst, full in pairs:
            dst.view(-1)[hp:hp + hi - lo].copy_(full[j].reshape(-1)[lo:hi])


def _cumsum(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def _wrappers(optimizer: Any) -> list[Any]:
    chain = []
    while optimizer is not None and len(chain) < 8:
        chain.append(optimizer)
        if isinstance(optimizer, RoutedAdamW):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _ds_version() -> str:
    try:
        import deepspeed
    except ImportError:
        return "?"
    return str(deepspeed.__version__)
