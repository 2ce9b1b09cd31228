"""8-bit blockwise Adam moments in bitsandbytes' format.

Each moment is stored as uint8 codes into a 256-entry dynamic map plus one fp32 absmax per
block of 256 values (the layout of ``bitsandbytes.optim.AdamW8bit``): m uses the signed map,
v the unsigned one, so x ~= code[q] * absmax[block]. A step dequantizes to fp32, runs the
ordinary routed update on the fp32 copies and requantizes; only the storage changes.
Tensors with fewer than ``min_8bit_size`` elements keep fp32 states, as in bitsandbytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

import lora_cl._quiet  # noqa: F401  (before bitsandbytes: drops one import notice)

STATE_BITS = (8, 32)
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
#: the keys of an 8-bit state: codes and block scales of m (1) and v (2), bitsandbytes' names
Q8_KEYS = ("state1", "absmax1", "state2", "absmax2")

#: elements dequantized at once in a step: bounds the transient fp32 m and v (8 B/element)
CHUNK_ELEMENTS = 1 << 22

T = TypeVar("T")
_MAPS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # pragma: no cover - bnb is a declared extra
        raise ImportError(
            "RoutedAdamW(state_bits=8) needs bitsandbytes: pip install 'lora-cl[bnb]' "
            "(or bitsandbytes>=0.45)"
        ) from err
    return bnb_functional


def check_available() -> None:
    """Raise a readable ImportError now rather than at the first step."""
    _bnb_functional()


def dynamic_maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """(signed map for m, unsigned map for v) on ``device``, built once per device."""
    if device not in _MAPS:
        bnb_f = _bnb_functional()
        _MAPS[device] = (bnb_f.create_dynamic_map(signed=True).to(device),
                         bnb_f.create_dynamic_map(signed=False).to(device))
    return _MAPS[device]


def init_8bit(p: Tensor) -> dict[str, Tensor]:
    """Zero m and v for ``p``: zero codes with zero block scales decode to exactly 0."""
    blocks = math.ceil(p.numel() / BLOCKSIZE)
    return {
        "state1": torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
        "absmax1": torch.zeros(blocks, dtype=torch.float32, device=p.device),
        "state2": torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
        "absmax2": torch.zeros(blocks, dtype=torch.float32, device=p.device),
    }


def is_8bit(state: dict[str, Any]) -> bool:
    """Whether a per-parameter optimizer state holds 8-bit moments."""
    return "state1" in state


def dequantize(state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """fp32 copies (m, v) of an 8-bit state."""
    bnb_f = _bnb_functional()
    signed, unsigned = dynamic_maps(state["state1"].device)
    m = bnb_f.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=signed,
                                   blocksize=BLOCKSIZE)
    v = bnb_f.dequantize_blockwise(state["state2"], absmax=state["absmax2"], code=unsigned,
                                   blocksize=BLOCKSIZE)
    return m, v


def requantize_(state: dict[str, Tensor], m: Tensor, v: Tensor) -> None:
    """Store fp32 (m, v) back into the 8-bit ``state`` (the new codes replace the old)."""
    bnb_f = _bnb_functional()
    signed, unsigned = dynamic_maps(m.device)
    # The CPU op has no out= variant: taking its fresh tensors saves a copy per moment.
    state["state1"], qs1 = bnb_f.quantize_blockwise(m, code=signed, blocksize=BLOCKSIZE)
    state["state2"], qs2 = bnb_f.quantize_blockwise(v, code=unsigned, blocksize=BLOCKSIZE)
    state["absmax1"], state["absmax2"] = qs1.absmax, qs2.absmax


class Chunk8bit:
    """Several 8-bit states dequantized together: one bitsandbytes call per moment, not per tensor.

    Each state's codes are laid end to end, every tensor padded to whole blocks, so no block
    straddles two tensors: the block scales, and so the codes, equal per-tensor quantization's
    exactly (a tail block's zero padding leaves its absmax unchanged). ``m`` and ``v`` are fp32
    views, one per state, into two flat buffers; :meth:`requantize_` writes the new codes and
    scales back into the states' own tensors. On a GPU this turns ~4 launches per LoRA tensor
    into 4 per chunk.
    """

    def __init__(self, states: Sequence[dict[str, Tensor]]) -> None:
        bnb_f = _bnb_functional()
        self.states = list(states)
        device = self.states[0]["state1"].device
        self.maps = dynamic_maps(device)
        self.sizes = [st["state1"].numel() for st in self.states]
        self.blocks = [math.ceil(n / BLOCKSIZE) for n in self.sizes]
        self.offsets = [0]
        for b in self.blocks:
            self.offsets.append(self.offsets[-1] + b * BLOCKSIZE)
        self.padded = [i for i, (n, b) in enumerate(zip(self.sizes, self.blocks, strict=True))
                       if n != b * BLOCKSIZE]
        flats = []
        #: (codes, block scales) of m and of v as they were read (requantize_(skip) keeps them)
        self.read: list[tuple[Tensor, Tensor]] = []
        for (key, amax), code in zip((("state1", "absmax1"), ("state2", "absmax2")), self.maps, strict=True):
            codes = self._laid_out([st[key].reshape(-1) for st in self.states], torch.uint8, device)
            absmax = torch.cat([st[amax] for st in self.states])
            flat = bnb_f.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCKSIZE)
            for i in self.padded:  # zero padding: it must not raise a tail block's absmax later
                flat[self.offsets[i] + self.sizes[i]:self.offsets[i + 1]].zero_()
            flats.append(flat)
            self.read.append((codes, absmax))
        self.flat_m, self.flat_v = flats
        shapes = [st["state1"].shape for st in self.states]
        self.m = self._views(self.flat_m, shapes)
        self.v = self._views(self.flat_v, shapes)

    def _laid_out(self, parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
        if not self.padded:
            return torch.cat(parts)
        out = torch.zeros(self.offsets[-1], dtype=dtype, device=device)
        torch._foreach_copy_(self._views(out, [t.shape for t in parts]), parts)
        return out

    def _views(self, flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
        return [flat[o:o + n].view(shape)
                for o, n, shape in zip(self.offsets[:-1], self.sizes, shapes, strict=True)]

    def requantize_(self, skip: Tensor | None = None) -> None:
        """Quantize the (updated) fp32 buffers and copy the codes and scales into the states.

        ``skip`` (a 0-d bool tensor, decided on the device) keeps the codes and scales read at
        construction where it is True: a skipped step leaves the states bit for bit as they were
        (requantizing unchanged values need not give back the same codes), with no host sync."""
        bnb_f = _bnb_functional()
        starts = [o // BLOCKSIZE for o in self.offsets[:-1]]
        for (key, amax), flat, code, (was_codes, was_absmax) in zip(
                (("state1", "absmax1"), ("state2", "absmax2")), (self.flat_m, self.flat_v), self.maps,
                self.read, strict=True):
            codes, qstate = bnb_f.quantize_blockwise(flat, code=code, blocksize=BLOCKSIZE)
            absmax = qstate.absmax
            if skip is not None:
                codes, absmax = torch.where(skip, was_codes, codes), torch.where(skip, was_absmax, absmax)
            torch._foreach_copy_([st[key].view(-1) for st in self.states],
                                 [codes[o:o + n] for o, n in zip(self.offsets[:-1], self.sizes, strict=True)])
            torch._foreach_copy_([st[amax] for st in self.states],
                                 [absmax[a:a + b] for a, b in zip(starts, self.blocks, strict=True)])


def state_nbytes(states: Iterable[dict[str, Any]]) -> int:
    """Bytes held by the tensors of per-parameter optimizer states (codes, scales, moments, step)."""
    return sum(t.numel() * t.element_size()
               for state in states for t in state.values() if isinstance(t, Tensor))


def chunks(items: Sequence[T], sizes: Sequence[int], budget: int = CHUNK_ELEMENTS) -> list[list[T]]:
    """Consecutive runs of ``items`` of at most ``budget`` elements (a larger item alone)."""
    out: list[list[T]] = []
    total = 0
    for item, n in zip(items, sizes, strict=True):
        if not out or total + n > budget:
            out.append([])
            total = 0
        out[-1].append(item)
        total += n
    return out


def layout_mismatch(saved: Iterable[tuple[Tensor, dict[str, Any]]], wants_8bit: Callable[[Tensor], bool],
                    saved_bits: int | None, state_bits: int) -> str | None:
    """Why checkpointed states do not fit this optimizer's storage (None when they do)."""
    if saved_bits is not None and saved_bits != state_bits:
        return f"the checkpoint holds state_bits={saved_bits} optimizer states"
    for p, state in saved:
        if "exp_avg" not in state and not is_8bit(state):
            continue  # no moments of its own (extras only, or ZeRO's per-tensor list): no layout
        if is_8bit(state) != wants_8bit(p):
            kind = "8-bit" if is_8bit(state) else "fp32"
            return f"the checkpoint holds {kind} states for a tensor of {p.numel()} elements"
    return None
