"""ContinualCallback: domain boundaries, bases, replay gradients and alpha/overlap logs on a Trainer."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lora_cl.diagnostics import optimizer_probes
from lora_cl.methods import MethodSpec
from lora_cl.optim import RoutedAdamW
from lora_cl.subspace import ActivationSample, SubspaceBank
from lora_cl.trainer.domain_data import adapter_snapshot, build_domain_bases, check_domain_data
from lora_cl.trainer.fsdp import fsdp_version, load_checkpoint_extra, save_checkpoint_extra, steps_fsdp2
from lora_cl.trainer.optimizer_factory import bank_of, method_of, routed_optimizer, unwrap_optimizer
from lora_cl.trainer.replay import (
    ReplayBuffer,
    ReplayDataError,
    is_indexable,
    replay_gradients,
    replay_share,
    seeded_subset,
)
from lora_cl.trainer.zero import (
    PER_TENSOR,
    release_zero,
    retire_zero3,
    route_under_zero,
    zero_masters,
    zero_stage3,
    zero_stage12,
)
from lora_cl.trainer.zero import SUPPORTED as ZERO_SUPPORTED
from lora_cl.trainer.zero3 import gathered_trainable

logger = logging.getLogger(__name__)

_FORMAT = 1


class ContinualCallback(TrainerCallback):
    """Runs one domain of a continual stream per ``trainer.train()`` on the stream's one RoutedAdamW.

    Per domain: ``set_domain(name, ...)``, then ``trainer.train()`` (a fresh Trainer per domain or
    the same one with a new ``train_dataset``; model, optimizer and callback are shared).
    Train begin: ``optimizer.start_domain`` (skipped on a mid-domain resume, ``global_step > 0``,
    so restored modifier state survives). Each step: replay gradient g_r supplied when the
    method replays. Each log: ``optimizer.metrics()`` and every ``probe_every`` logs the probes.
    Train end: ``optimizer.end_domain``, that domain's bases into the bank, an adapter snapshot,
    replay examples kept. Attach with :func:`attach` so ``report_to`` integrations see the keys.
    """

    def __init__(self, *, probe_every: int = 10, keep_snapshots: bool = True,
                 seed: int | None = None) -> None:
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0 (0: no probes), got {probe_every}")
        self.probe_every = int(probe_every)
        self.keep_snapshots = keep_snapshots
        self.seed = seed
        self.domains: list[str] = []  # finished domains, in order
        self.current: str | None = None
        self.started = False  # the current domain's start_domain ran (it has not ended)
        self.replay = ReplayBuffer()
        self.snapshots: dict[str, dict[str, Tensor]] = {}
        self.basis_build_seconds: dict[str, float] = {}
        self.bases_added: dict[str, int] = {}
        self.log_count = 0
        self.last_replay_loss: float | None = None
        # (sum of the routed tensors' v, optimizer step) when the current domain began
        self.v_start: tuple[float, int] | None = None
        self.v_current_share: dict[str, float] = {}
        self._inputs: dict[str, Any] = {}
        self._source: Any = None  # indexable examples of the current domain (replay / basis sample)
        self._collate: Any = None
        self._optimizer: RoutedAdamW | None = None
        self._trainer: weakref.ref[Any] | None = None
        self._emitting = False
        self._warned_order = False
        self._zero3: Any = None  # this domain's DeepSpeed ZeRO-3 optimizer, retired at the next's start
        # activation_sample="last_steps": the global step from which the training forwards are
        # sampled (None: not sampling this domain), and the hooks' sample once it began
        self.sample_from: int | None = None
        self._sample: ActivationSample | None = None

    # -- user API ------------------------------------------------------------------------
    @property
    def domain_index(self) -> int:
        """Index of the current (or next) domain: the number of finished domains."""
        return len(self.domains)

    @property
    def optimizer(self) -> RoutedAdamW | None:
        return self._optimizer

    @property
    def method(self) -> MethodSpec | None:
        return None if self._optimizer is None else method_of(self._optimizer)

    @property
    def bank(self) -> SubspaceBank | None:
        return None if self._optimizer is None else bank_of(self._optimizer)

    def set_domain(self, name: str, train_dataset: Any = None,
                   basis_batches: Iterable[Mapping[str, Any]] | None = None,
                   replay_source: Any = None) -> None:
        """Name the domain the next ``trainer.train()`` runs, with optional data for it.

        ``train_dataset``: the examples this domain contributes to the replay buffer and the
        activation-basis sample (rows the Trainer's collator accepts; default: the dataset the
        Trainer trains on). ``basis_batches``: model-ready batches for activation bases.
        ``replay_source``: an indexable dataset replayed during this domain instead of the buffer.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"set_domain: name must be a non-empty str, got {name!r}")
        if name in self.domains:
            raise ValueError(f"set_domain: domain {name!r} already finished (finished: "
                             f"{self.domains}); domain names must be unique")
        if self.started and name != self.current:
            raise RuntimeError(f"set_domain({name!r}): domain {self.current!r} started but did not "
                               f"end; finish it first (set_domain({self.current!r}) and "
                               "trainer.train(resume_from_checkpoint=...))")
        for label, data in (("train_dataset", train_dataset), ("replay_source", replay_source)):
            if data is not None and not is_indexable(data):
                raise ReplayDataError(f"set_domain({name!r}): {label} must support len() and "
                                      f"indexing, got {type(data).__name__}")
        self.current = name
        self._inputs = {"train_dataset": train_dataset, "basis_batches": basis_batches,
                        "replay_source": replay_source}

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        optimizer = routed_optimizer(kwargs.get("optimizer"))
        if self.current is None:
            raise RuntimeError("ContinualCallback: call callback.set_domain(name) before each "
                               "trainer.train() of the stream")
        if self._optimizer is not None and optimizer is not self._optimizer and self.domains:
            raise RuntimeError("ContinualCallback: this Trainer steps a different RoutedAdamW than "
                               "the earlier domains; the stream needs one optimizer (its bank and "
                               "modifier state): pass the same optimizer to every Trainer")
        _check_fsdp(args, optimizer)
        optimizer.rebind_states()  # accelerate's FSDP2 prepare swapped in the sharded parameters
        if state.global_step > 0 and steps_fsdp2(optimizer):
            load_checkpoint_extra(optimizer, args, state.global_step)
        self._zero3 = retire_zero3(self._zero3, kwargs.get("optimizer"))
        self._optimizer = optimizer
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            feed_clip_norm(trainer)  # (a Trainer that re-made its accelerator since attach)
        check_steps_model_tensors(optimizer, kwargs.get("model"), kwargs.get("optimizer"))
        spec = method_of(optimizer)
        if spec.basis is not None and bank_of(optimizer) is None:
            raise RuntimeError(f"ContinualCallback: method {spec.name!r} builds {spec.basis} bases "
                               "but the optimizer has no SubspaceBank (use lora_cl.make_optimizer)")
        loader = kwargs.get("train_dataloader")
        self._collate = getattr(loader, "collate_fn", None)
        given = self._inputs.get("train_dataset")
        self._source = given if given is not None else getattr(loader, "dataset", None)
        check_domain_data(spec, self.current, self._source, self._collate, user_rows=given is not None,
                          has_basis_batches=self._inputs.get("basis_batches") is not None,
                          replay_source=self._inputs.get("replay_source"))
        self.sample_from = self._sample_window(spec, args, state)
        if state.global_step == 0:  # a resumed Trainer restored the modifiers: no reset
            optimizer.start_domain(self.current)
            mass = v_mass(optimizer)
            self.v_start = None if mass is None else (mass, optimizer.global_step)
        self.started = True
        self._check_order(args)

    def _sample_window(self, spec: MethodSpec, args: TrainingArguments, state: TrainerState) -> int | None:
        """activation_sample="last_steps": the step after which the training forwards are sampled,
        enough of the domain's last steps for ``basis_examples`` examples."""
        if spec.basis != "activation" or spec.activation_sample != "last_steps":
            return None
        if args.world_size > 1:
            raise RuntimeError(
                f"ContinualCallback: method {spec.name!r} samples its activation bases from the "
                f"training forwards (activation_sample='last_steps'), which differ across the "
                f"{args.world_size} ranks, so their bases would too; use activation_sample='end' "
                "(the same examples on every rank) when training on several processes")
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return max(0, state.max_steps - math.ceil(spec.basis_examples / per_step))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if (self.sample_from is not None and self._sample is None and self.started
                and state.global_step >= self.sample_from):
            seed = self._seed(args) + self.domain_index
            self._sample = ActivationSample(kwargs["model"], seed=seed).attach()
        if getattr(args, "deepspeed", None):
            # DeepSpeed steps inside the backward of the step's last micro-batch, before
            # on_pre_optimizer_step: g_r comes now, at the same parameters (they change only at
            # the step), so the routed step of this very step mixes it in
            self._supply_replay(args, state, kwargs["model"])

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        if not getattr(args, "deepspeed", None):
            self._supply_replay(args, state, kwargs["model"])

    def _supply_replay(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        """This step's replay gradient g_r into the optimizer (methods that replay; every rank).

        One draw of ``replay_batch_size`` (default: the per-device batch) examples per rank, seeded
        by the step and not by the rank, so the ranks replay disjoint shares of one draw of
        ``world`` times that size and average their token-weighted gradients
        (:func:`~lora_cl.trainer.replay.replay_gradients`): N ranks replay what one process with
        an N-times larger replay batch replays, to rounding.
        """
        optimizer = self._optimizer
        if optimizer is None or not self.started or method_of(optimizer).replay is None:
            return
        spec = method_of(optimizer)
        world = max(1, int(args.world_size))
        size = (spec.replay_batch_size or args.per_device_train_batch_size) * world
        seed = (self._seed(args) * 1_000_003 + state.global_step) * 131
        pool = self._inputs.get("replay_source")
        if pool is not None:
            examples = [pool[i] for i in seeded_subset(len(pool), size, seed)]
        elif len(self.replay):
            examples = self.replay.sample(size, seed)
        else:
            return  # first domain: nothing to replay yet, g~ = g
        names, params = routed_model_params(optimizer, model)
        share, counted = replay_share(examples, world, int(args.process_index))
        # (activation_sample="last_steps" samples this domain's training forwards, not replayed ones)
        with self._sample.pause() if self._sample is not None else contextlib.nullcontext():
            loss, grads = replay_gradients(model, self._collate(share), names, params, counted=counted,
                                           max_norm=float(args.max_grad_norm or 0.0))
        optimizer.supply(replay_grads=grads)
        self.last_replay_loss = loss

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        optimizer = self._optimizer
        if optimizer is not None and steps_fsdp2(optimizer):
            save_checkpoint_extra(optimizer, args, state)
        if self.sample_from is not None and state.global_step > self.sample_from:
            warnings.warn(f"ContinualCallback: checkpoint at step {state.global_step} inside the steps "
                          f"whose inputs the activation bases sample (after step {self.sample_from}); "
                          "the sample is not saved, so a run resumed from it samples fewer steps. "
                          "lora-cl train skips checkpoints there", RuntimeWarning, stacklevel=2)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._emitting or logs is None or self._optimizer is None:
            return
        if any(k.startswith(("eval_", "test_")) for k in logs):
            return
        extra = self.metrics()
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(k in last for k in logs
                                                                             if k not in extra):
            last.update(extra)  # log_history copied the logs before on_log ran

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        optimizer = self._optimizer
        if optimizer is None or not self.started or self.current is None:
            return
        name, index, spec = self.current, self.domain_index, method_of(optimizer)
        model = kwargs["model"]
        release_zero(kwargs.get("optimizer"))  # under ZeRO: per-tensor layout again, as in one process
        # importance/EWC read the weights whole: ZeRO-3's partitions gathered for the block, ZeRO's
        # fp32 masters under bf16 (FSDP2's shards: end_domain gathers them itself)
        consolidates = any(m.consolidates for m in optimizer.modifiers)
        with (gathered_trainable(model) if consolidates and not steps_fsdp2(optimizer)
              else contextlib.nullcontext()):
            optimizer.end_domain(name, params=zero_masters(optimizer))
        share = current_v_share(optimizer, self.v_start)
        if share is not None:
            self.v_current_share[name] = share
        start = time.perf_counter()
        # ZeRO-3 keeps the LoRA tensors as (0,)-shaped partitions: whole for adapter bases, which
        # read them (activation bases run forwards, whose hooks gather and release them again)
        sample, self._sample, self.sample_from = self._sample, None, None
        if sample is not None:
            sample.detach()
        with gathered_trainable(model) if spec.basis == "adapter" else contextlib.nullcontext():
            added = build_domain_bases(spec, optimizer, bank_of(optimizer), model, name,
                                       seed=self._seed(args) + index,
                                       basis_batches=self._inputs.get("basis_batches"),
                                       source=self._source, collate=self._collate,
                                       batch_size=args.per_device_train_batch_size,
                                       activation_sample=sample)
        # activation_sample="last_steps": the hooks' time during the sampled steps counts too
        seconds = time.perf_counter() - start + (sample.seconds if sample is not None else 0.0)
        self.basis_build_seconds[name], self.bases_added[name] = seconds, added
        if spec.basis is not None and added == 0:
            warnings.warn(f"domain {name!r}: method {spec.name!r} built no {spec.basis} bases, so "
                          "nothing will protect this domain (too few steps or examples, or LoRA "
                          "dimensions not above the basis rank?)", RuntimeWarning, stacklevel=2)
        if self.keep_snapshots:
            with gathered_trainable(model):
                self.snapshots[name] = adapter_snapshot(model, optimizer)
        if spec.replay is not None and self._source is not None:
            self.replay.fraction = spec.replay_fraction
            self.replay.add_domain(name, self._source, domain_index=index, seed=self._seed(args))
        self.domains.append(name)
        self.current, self.started, self._inputs, self._source = None, False, {}, None
        logger.info("lora-cl: domain %r ended; %d bases built in %.3f s", name, added, seconds)
        self._emit(state, {"cl/basis_build_seconds": seconds, "cl/bases_added": float(added),
                           "cl/domain_index": float(index),
                           **({} if share is None else {"cl/v_current_share": share})})

    # -- pieces ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Scalars for one log: optimizer metrics, domain index, replay loss, periodic probes."""
        optimizer = self._optimizer
        if optimizer is None:
            return {}
        out = dict(optimizer.metrics())
        out["cl/domain_index"] = float(self.domain_index)
        if self.last_replay_loss is not None:
            out["cl/replay_loss"] = self.last_replay_loss
        if method_of(optimizer).replay is not None:
            out["cl/replay_examples"] = float(len(self.replay))
        self.log_count += 1
        bank = bank_of(optimizer)
        if bank is not None and self.probe_every and (self.log_count - 1) % self.probe_every == 0:
            out.update(optimizer_probes(optimizer, bank))
        return out

    def _seed(self, args: TrainingArguments) -> int:
        return int(self.seed if self.seed is not None else args.seed)

    def _emit(self, state: TrainerState, values: dict[str, float]) -> None:
        """Log through the attached Trainer (reaches report_to), else into ``log_history`` only."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None and trainer.state is state:
            self._emitting = True
            try:
                trainer.log(dict(values))
            finally:
                self._emitting = False
        else:
            state.log_history.append({**values, "step": state.global_step})

    def _check_order(self, args: TrainingArguments) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        attached = trainer is not None and trainer.args is args
        reports = [r for r in (args.report_to or []) if r != "none"]
        if reports and not attached and not self._warned_order:
            self._warned_order = True
            warnings.warn("ContinualCallback is not attached with lora_cl.attach(trainer, callback): "
                          f"the report_to integrations {reports} run before it and will not see "
                          "alpha/overlap (trainer.state.log_history still does)", stacklevel=2)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self, include_snapshots: bool = False) -> dict[str, Any]:
        """What the callback keeps; JSON-serialisable unless ``include_snapshots`` (CPU tensors)."""
        state: dict[str, Any] = {
            "format": _FORMAT, "domains": list(self.domains), "current": self.current,
            "started": self.started, "replay": self.replay.state_dict(),
            "basis_build_seconds": dict(self.basis_build_seconds),
            "bases_added": dict(self.bases_added), "log_count": self.log_count,
            "last_replay_loss": self.last_replay_loss,
            "v_start": None if self.v_start is None else list(self.v_start),
            "v_current_share": dict(self.v_current_share),
        }
        if include_snapshots:
            state["snapshots"] = {d: dict(s) for d, s in self.snapshots.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; earlier domains' datasets go in ``replay.datasets`` again."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"ContinualCallback state format {state.get('format')!r} != {_FORMAT}")
        self.domains = [str(d) for d in state["domains"]]
        self.current, self.started = state["current"], bool(state["started"])
        self.replay.load_state_dict(state["replay"])
        self.basis_build_seconds = {str(k): float(v) for k, v in state["basis_build_seconds"].items()}
        self.bases_added = {str(k): int(v) for k, v in state["bases_added"].items()}
        self.log_count = int(state["log_count"])
        self.last_replay_loss = state["last_replay_loss"]
        v_start = state.get("v_start")  # (absent from states written before it was kept)
        self.v_start = None if v_start is None else (float(v_start[0]), int(v_start[1]))
        self.v_current_share = {str(k): float(v) for k, v in state.get("v_current_share", {}).items()}
        if "snapshots" in state:
            self.snapshots = {d: dict(s) for d, s in state["snapshots"].items()}
        self._optimizer, self._inputs = None, {}


def v_mass(optimizer: RoutedAdamW) -> float | None:
    """Sum of Adam's second moment v over every tensor the optimizer steps (None before any has
    a state). Under DeepSpeed ZeRO-1/2 the fp32 moments are this rank's partitions (rank 0 writes
    the metric) and 8-bit ones the whole per-tensor states every rank keeps."""
    from lora_cl.optim.routed_adamw import state_moments

    total, seen = 0.0, False
    for p in (p for group in optimizer.param_groups for p in group["params"]):
        state = optimizer.state.get(p, {})
        for moments in map(state_moments, [state, *state.get(PER_TENSOR, ())]):
            if moments is not None:
                total += float(moments[1].double().sum())
                seen = True
    return total if seen else None


def current_v_share(optimizer: RoutedAdamW, start: tuple[float, int] | None) -> float | None:
    """The share of the optimizer's v (its mass, summed over tensors) that came from this domain's
    gradients.

    After k steps v = beta2^k v0 + (the EMA of this domain's g^2), so the share is
    1 - beta2^k v0 / v; 1.0 for the first domain (v0 = 0). It stays far below 1 while k is short
    against Adam's horizon 1 / (1 - beta2): the regime where v still holds older domains' gradients.
    """
    mass = v_mass(optimizer)
    if mass is None or mass <= 0:
        return None
    if start is None:
        return 1.0
    v0, step0 = start
    beta2 = float(optimizer.param_groups[0]["betas"][1])
    k = optimizer.global_step - step0
    return float(max(0.0, 1.0 - beta2**k * v0 / mass))


def check_steps_model_tensors(optimizer: RoutedAdamW, model: Any, wrapped: Any = None) -> None:
    """Refuse optimizers whose routed tensors are not the model's own, unless ZeRO routes them.

    DeepSpeed ZeRO stage >= 1 (and its stage-0 bf16/fp16 optimizers) hands the client optimizer
    flat fp32 slices of the parameters: projection would see 1-D fragments instead of the 2-D
    LoRA gradients. Under ZeRO-1/2/3 :func:`lora_cl.trainer.zero.route_under_zero` (given the
    Trainer's ``wrapped`` optimizer) steps the full tensors instead, with single-process math;
    every other case refuses with a message naming what to use.
    """
    if model is None:
        return
    if all(group["routing"] == "vanilla" for group in optimizer.param_groups):
        # plain fp32 AdamW is element-wise: exact on flat slices too. Under ZeRO-1/2 it still
        # steps through ZeroRoutedStep (the same math on full tensors), so that a stream's domain
        # end can give the optimizer back its per-tensor groups for the next engine (without it
        # the second domain's engine met the first one's flat partitions: KeyError in DeepSpeed),
        # and so that 8-bit states quantize the blocks of each tensor as one process does. ZeRO-3
        # likewise: its first engine leaves the groups' params empty outside step()
        if wrapped is not None and (zero_stage12(wrapped) is not None or zero_stage3(wrapped) is not None):
            route_under_zero(wrapped, optimizer)
        return
    model_ids = {id(p) for p in model.parameters()}
    names, params = optimizer.routed_named_params()
    foreign = [n for n, p in zip(names, params, strict=True) if id(p) not in model_ids]
    if not foreign and params:
        return  # (ZeRO-3 leaves the groups empty outside step(): no tensors is not "the model's own")
    if wrapped is not None and route_under_zero(wrapped, optimizer):
        return
    raise RuntimeError(
        "ContinualCallback: the Trainer's RoutedAdamW steps copies of the LoRA tensors, not the "
        f"model's own ({len(foreign)} of {len(params)}, e.g. {foreign[:1]}), and no DeepSpeed ZeRO "
        "optimizer wraps it that lora-cl could route on full tensors; routed projection needs the "
        "2-D LoRA gradients, so lora-cl refuses rather than train with different math. Use "
        f"{ZERO_SUPPORTED}; see docs/deepspeed.md")


def _refuse_optimizer_offload(trainer: Any) -> None:
    """DeepSpeed's offload_optimizer makes the Trainer step DeepSpeedCPUAdam, not the RoutedAdamW:
    refuse from the config, before the engine builds that optimizer (a minute on a CPU)."""
    from lora_cl.dsconfig import read_zero

    config = getattr(getattr(getattr(trainer, "args", None), "hf_deepspeed_config", None), "config", None)
    if not config:
        return
    device = read_zero(config).optimizer_offload
    if device != "none":
        raise TypeError(
            "ContinualCallback needs the Trainer to step a lora_cl.RoutedAdamW, but the DeepSpeed "
            f"config offloads the optimizer (zero_optimization.offload_optimizer.device={device!r}), "
            "which makes DeepSpeed step its own DeepSpeedCPUAdam; remove offload_optimizer "
            "(deepspeed_configs/zero2.json routes LoRA on full tensors without it)")


def routed_model_params(optimizer: RoutedAdamW, model: Any) -> tuple[list[str], list[Tensor]]:
    """The names and the model's own tensors of the routed LoRA tensors, during a domain.

    The optimizer's groups hold them, except under DeepSpeed ZeRO, whose engine puts its flat fp32
    partitions in their place until the domain's end: then the model's tensors of the groups'
    ``param_names`` (ZeRO-3's are (0,)-shaped partitions that its forward hooks gather).
    """
    names, params = optimizer.routed_named_params()
    own = {id(p) for p in model.parameters()}
    if params and all(id(p) in own for p in params):
        return names, params
    by_name = dict(model.named_parameters())
    names = [n for g in optimizer.param_groups if g["routing"] != "vanilla" for n in g.get("param_names", ())]
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        raise RuntimeError(f"ContinualCallback: {len(missing)} routed tensor name(s) are not the model's "
                           f"(first: {missing[:1]}), so the replay gradient cannot be taken; build the "
                           "optimizer with lora_cl.make_optimizer on this model")
    return names, [by_name[n] for n in names]


def _check_fsdp(args: TrainingArguments, optimizer: RoutedAdamW) -> None:
    """The stream runs under the Trainer's FSDP2 (lora_cl.trainer.fsdp); refuse, in one line
    naming what works, FSDP1 (flat parameters), an FSDP the Trainer did not apply (a CPU without
    :func:`~lora_cl.trainer.fsdp.fsdp2_trainer`: accelerate trains it as DDP)."""
    if not getattr(args, "fsdp", None):
        return
    version = fsdp_version(args)
    if version != 2:
        raise RuntimeError(
            f"ContinualCallback runs under FSDP2 only (TrainingArguments.fsdp_config fsdp_version="
            f"{version}: FSDP1 flattens the LoRA tensors, which the projections need whole); set "
            "fsdp_config={'fsdp_version': 2, ...} (lora-cl recipes: training.fsdp: true)")
    if not steps_fsdp2(optimizer):
        raise RuntimeError(
            "ContinualCallback: TrainingArguments.fsdp is set but the Trainer did not shard the model "
            "(on a CPU accelerate trains fsdp=... as plain DDP); build the Trainer class with "
            "lora_cl.trainer.fsdp.fsdp2_trainer(Trainer), or run lora-cl train with training.fsdp: true")


def attach(trainer: Any, callback: ContinualCallback | None = None, **kwargs: Any) -> ContinualCallback:
    """Put ``callback`` first in ``trainer``'s callbacks (made from ``kwargs`` if None); return it.

    The Trainer runs its reporting integrations (wandb, tensorboard, ...) before callbacks given
    by the user, so keys merged into ``logs`` by a later callback never reach them; first in
    line, the alpha/overlap keys do. Call once per Trainer of the stream.
    """
    if callback is None:
        callback = ContinualCallback(**kwargs)
    elif kwargs:
        raise TypeError("attach: pass either a callback or its keyword arguments, not both")
    _refuse_optimizer_offload(trainer)
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [cb for cb in callbacks if cb is not callback]
    callbacks.insert(0, callback)
    callback._trainer = weakref.ref(trainer)
    feed_clip_norm(trainer)
    return callback


def feed_clip_norm(trainer: Any) -> None:
    """Hand the norm the Trainer's gradient clipping computes to its RoutedAdamW's guard.

    The Trainer takes the total gradient norm before every optimizer step (with
    ``max_grad_norm > 0`` it clips with it; else it takes it with an infinite bound), through
    ``trainer.accelerator.clip_grad_norm_``. This wraps that method of this Trainer's
    accelerator so the norm also reaches ``RoutedAdamW.supply_grad_norm``: the non-finite guard
    then reads no gradient a second time. Not under DeepSpeed, whose engine clips its own flat
    buffers. Idempotent.
    """
    accelerator = getattr(trainer, "accelerator", None)
    clip = getattr(accelerator, "clip_grad_norm_", None)
    if clip is None or getattr(clip, "_lora_cl_feeds", False) or getattr(
            trainer, "is_deepspeed_enabled", False):
        return
    owner = weakref.ref(trainer)

    def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2) -> Any:
        params = list(parameters)
        norm = clip(params, max_norm, norm_type=norm_type)
        held = owner()
        optimizer = unwrap_optimizer(getattr(held, "optimizer", None)) if held is not None else None
        if isinstance(optimizer, RoutedAdamW) and isinstance(norm, Tensor):
            optimizer.supply_grad_norm(norm, params)
        return norm

    clip_grad_norm_._lora_cl_feeds = True  # type: ignore[attr-defined]
    accelerator.clip_grad_norm_ = clip_grad_norm_
