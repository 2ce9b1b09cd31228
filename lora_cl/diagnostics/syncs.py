"""Count host syncs: the calls that copy a device value to Python and so wait for the device.

``.item()``, ``bool()``, ``float()``, ``int()`` and ``.tolist()`` of a tensor all dispatch to
``aten._local_scalar_dense``, on every device; :class:`CountSyncs` counts those dispatches, so a
count taken on a CPU is the count a GPU run makes::

    with CountSyncs() as mode:
        optimizer.step()
    assert mode.syncs == 0
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountSyncs(TorchDispatchMode):
    """A dispatch mode counting ``aten._local_scalar_dense`` calls in ``syncs``."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))
