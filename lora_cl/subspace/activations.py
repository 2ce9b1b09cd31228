"""Activation bases (GPM): the input space each LoRA layer saw on a domain, minus what is kept."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_cl.subspace._peft import lora_linears
from lora_cl.subspace.bank import SubspaceBank
from lora_cl.subspace.builders import NULL_TOL


class _TokenSample:
    """Uniform sample without replacement of <= max_tokens rows from a stream of row blocks.

    Each row draws a key u ~ U(0, 1); the rows with the smallest keys seen so far are kept, in a
    fixed buffer: a new block only writes its own kept rows into the slots of the rows they evict
    (empty slots hold key +inf), so sampling costs O(block), not O(max_tokens), per forward.
    """

    def __init__(self, max_tokens: int, generator: torch.Generator) -> None:
        self.max_tokens = max_tokens
        self.generator = generator
        self._buf: Tensor | None = None
        self.keys = torch.full((max_tokens,), float("inf"))

    @property
    def rows(self) -> Tensor | None:
        """The kept rows (n <= max_tokens, d), float32 on the CPU; None before any block."""
        return None if self._buf is None else self._buf[torch.isfinite(self.keys)]

    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Offer the rows of ``x`` (..., d) where ``mask`` (x's leading shape) is set, else all;
        only the rows that enter the sample are copied (to the CPU, float32)."""
        flat = x.detach().reshape(-1, x.shape[-1])
        where = None if mask is None else mask.reshape(-1).to(flat.device).bool().nonzero().squeeze(1)
        keys = torch.rand(flat.shape[0] if where is None else where.numel(), generator=self.generator)
        if self._buf is None:
            self._buf = torch.zeros(self.max_tokens, flat.shape[1], dtype=torch.float32)
        n = self.max_tokens
        kept = torch.topk(torch.cat([self.keys, keys]), n, largest=False, sorted=False).indices
        new = kept[kept >= n] - n  # the block's rows that enter the sample
        if new.numel() == 0:
            return
        stays = torch.zeros(n, dtype=torch.bool)
        stays[kept[kept < n]] = True
        free = (~stays).nonzero().squeeze(1)  # the slots they take (evicted or empty)
        rows = new.to(flat.device) if where is None else where[new.to(flat.device)]
        self._buf[free] = flat[rows].to(device="cpu", dtype=torch.float32)
        self.keys[free] = keys[new]


def _gpm_directions(x: Tensor, old: Tensor, energy: float, max_new: int) -> Tensor:
    """New orthonormal directions (d, k) of samples x (n, d) beyond the kept basis ``old``.

    R = X - X U U^T = P S V^T; k = smallest with ||X U||^2 + sum_{i<=k} S_i^2 >= energy ||X||^2
    (GPM's criterion), then V[:, :k] is re-orthogonalised against U. S^2 and V come from the
    eigendecomposition of R^T R (d x d, float64): several times cheaper than the SVD of R for
    n >> d, and exact enough for an energy threshold (directions below 1e-6 of the top singular
    value, ``NULL_TOL``, are dropped either way).
    """
    total = x.double().square().sum()
    r = x - (x @ old) @ old.mT
    rd = r.double()
    captured = total - rd.square().sum()
    if total <= 0 or captured >= energy * total or max_new <= 0:
        return x.new_zeros(x.shape[1], 0)
    evals, evecs = torch.linalg.eigh(rd.mT @ rd)  # ascending
    sq = evals.flip(0).clamp_min(0.0)
    v = evecs.flip(1)
    sigma = sq.sqrt()
    cum = captured + torch.cumsum(sq, 0)
    k = int((cum < energy * total * (1 - 1e-12)).sum()) + 1
    k = min(k, int((sigma > NULL_TOL * sigma[0]).sum()), max_new)
    v = v[:, :k].to(x.dtype)
    v = v - old @ (old.mT @ v)
    q, _ = torch.linalg.qr(v)
    return q.contiguous()


class _Collected(Exception):
    """Raised by the hook after the last LoRA layer to end a forward early."""


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


class ActivationSample:
    """Forward pre-hooks that sample each LoRA layer's inputs (padding dropped via the batch's
    ``attention_mask``), uniformly, at most ``max_tokens`` rows per distinct input (q, k and v take
    one tensor in a row and share its sample), with a generator seeded by ``seed``.

    ``attach(model)`` installs the hooks (and one on the model itself that reads each forward's
    attention mask and arms the layer hooks for that forward only, so the recomputation of a
    gradient-checkpointed layer during backward is not sampled twice); ``detach()`` removes them.
    :func:`activation_bases` samples forwards it runs itself; ``ContinualCallback`` with
    ``activation_sample="last_steps"`` samples the domain's last training forwards instead.
    """

    def __init__(self, model: nn.Module, *, adapter_name: str = "default", max_tokens: int = 4096,
                 seed: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens!r}")
        self.layers = lora_linears(model, adapter_name)
        self.model = model
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: dict[str, _TokenSample] = {}  # a_name -> its sample (shared by layers fed one input)
        self.owners: dict[str, str] = {}  # a_name -> the layer whose sample it shares (itself: samples)
        self.current: dict[str, Any] = {"mask": None, "last": None, "last_layer": None, "armed": False}
        self.handles: list[Any] = []
        self.forwards = 0  # model forwards sampled
        self.paused = False  # forwards while True are not sampled (a replay batch's, say)
        self.seconds = 0.0  # time spent in the layer hooks (what sampling adds to the forwards)

    def _layer_hook(self, a_name: str) -> Any:
        current, owners, samples = self.current, self.owners, self.samples

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not current["armed"]:
                return
            start = time.perf_counter()
            try:
                sample(args[0] if args else kwargs["x"])
            finally:
                self.seconds += time.perf_counter() - start

        def sample(x: Tensor) -> None:
            current["last_layer"] = a_name
            last = current["last"]  # (tensor, owner): held, so its memory cannot be reused meanwhile
            if a_name not in owners:  # q, k and v (gate and up) take one tensor in a row: share it
                owners[a_name] = last[1] if last is not None and last[0] is x else a_name
                samples[a_name] = (samples[owners[a_name]] if owners[a_name] != a_name
                                   else _TokenSample(self.max_tokens, self.generator))
            current["last"] = (x, owners[a_name])
            if owners[a_name] != a_name:
                return
            mask = current["mask"]
            fits = mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape)
            samples[a_name].add(x, mask if fits else None)
        return hook

    def _model_pre_hook(self, _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.paused or not torch.is_grad_enabled():  # (an evaluation inside training, or a
            return  # forward that is not the domain's: neither is a training forward of it)
        self.current.update(mask=kwargs.get("attention_mask"), last=None, armed=True)
        self.forwards += 1

    def _model_hook(self, *_: Any) -> None:
        self.current.update(last=None, armed=False)

    def attach(self, *, top_level: bool = True) -> ActivationSample:
        """Install the hooks; ``top_level=False`` leaves arming and the mask to the caller."""
        self.handles += [m.layer.register_forward_pre_hook(self._layer_hook(m.a_name), with_kwargs=True)
                         for m in self.layers]
        if top_level:
            self.handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self.handles.append(self.model.register_forward_hook(self._model_hook))
        return self

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Forwards inside the block are not sampled (the callback's replay forwards: earlier
        domains' examples, whose inputs are not this domain's)."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.current.update(last=None, armed=False)

    def add_bases(self, bank: SubspaceBank, domain: str, *, energy: float = 0.97,
                  max_rank: int | None = None) -> int:
        """Each sampled LoRA layer's new input-space basis into ``bank`` (see :func:`activation_bases`)."""
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        return _add_bases(self.layers, self.samples, bank, domain, energy, max_rank)


def activation_bases(model: nn.Module, batches: Iterable[Mapping[str, Any]], bank: SubspaceBank,
                     domain: str, *, energy: float = 0.97, max_rank: int | None = None,
                     adapter_name: str = "default", max_tokens: int = 4096, seed: int = 0) -> int:
    """Run ``batches`` through ``model`` and add each LoRA layer's new input-space basis (GPM).

    Per linear LoRA layer: X (tokens, d_in) = its inputs (padding dropped via the batch's
    attention_mask, uniformly subsampled to ``max_tokens`` rows with a generator seeded by
    ``seed``); U = the bank's current projector for the lora_A weight (side "in");
    R = X - X U U^T; the top directions of R that bring ||X U||^2 + captured to ``energy``
    ||X||^2 (at most ``max_rank`` new ones per layer) are added as side "in" bases of the lora_A
    weight with weights 1 (hard GPM). Runs in eval mode under no_grad; the model's train/eval
    flags and hooks are restored. Returns the number of bases added.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    sample = ActivationSample(model, adapter_name=adapter_name, max_tokens=max_tokens, seed=seed)
    current = sample.current

    def stop_hook(_mod: nn.Module, _args: Any, _out: Any) -> None:
        raise _Collected  # every LoRA layer has its input: skip the rest (LM head, loss)

    flags = [(mod, mod.training) for mod in model.modules()]
    sample.attach(top_level=False)
    by_name = {m.a_name: m for m in sample.layers}
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                current.update(mask=batch.get("attention_mask"), last=None, armed=True)
                inputs = {k: v for k, v in _to_device(batch, device).items() if k != "labels"}
                try:
                    model(**inputs)
                except _Collected:
                    pass
                if i == 0 and current["last_layer"]:  # the first batch ran through: its last LoRA layer
                    sample.handles.append(by_name[current["last_layer"]].layer.register_forward_hook(stop_hook))
    finally:
        sample.detach()
        for mod, was_training in flags:
            mod.training = was_training
    return _add_bases(sample.layers, sample.samples, bank, domain, energy, max_rank)


def _add_bases(layers: list[Any], samples: dict[str, _TokenSample], bank: SubspaceBank, domain: str,
               energy: float, max_rank: int | None) -> int:
    results: dict[tuple[int, Any], Tensor] = {}  # (sample, old projector) -> new directions
    added = 0
    for m in layers:
        sample = samples.get(m.a_name)
        x = None if sample is None else sample.rows
        if x is None or x.shape[0] == 0:
            continue
        proj = bank.projector(m.a_name, "in")
        old = proj[0] if proj is not None else x.new_zeros(x.shape[1], 0)
        max_new = x.shape[1] - old.shape[1]
        if max_rank is not None:
            max_new = min(max_new, max_rank)
        key = next((k for k in results if k[0] == id(sample) and torch.equal(k[1], old)), None)
        if key is None:  # layers sharing a sample and an old basis (q, k, v) share the result
            key = (id(sample), old)
            results[key] = _gpm_directions(x, old, energy, max_new)
        new = results[key]
        if new.shape[1]:
            bank.add(domain, m.a_name, new, torch.ones(new.shape[1]), side="in")
            added += 1
    return added
