"""A TorchDispatchMode that refuses device→host synchronisation and counts aten ops.

``aten._local_scalar_dense`` is what ``.item()``, ``bool()``, ``int()`` and ``float()`` of a
tensor dispatch to: on a GPU each one waits for the device. Under ``SyncGuard(fail=True)`` such
a call raises at once with the Python stack that made it; ``SyncGuard(fail=False)`` only
counts them (``syncs``). ``ops`` counts every other aten op (a custom op counts as one).

On the CPU every tensor is a host tensor, so tensors that live on the host by design even when
the model is on a GPU are named in ``host_tensors`` and may be read: Adam's step counters
(``capturable=False``, PyTorch's default, keeps ``state["step"]`` on the CPU for CUDA
parameters, and its update reads it as a Python number without waiting for the device).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


class HostSyncError(AssertionError):
    pass


class SyncGuard(TorchDispatchMode):
    def __init__(self, fail: bool = True, host_tensors=()):
        super().__init__()
        self.fail, self.syncs, self.ops = fail, 0, collections.Counter()
        self.host = {t.data_ptr() for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is LOCAL_SCALAR and args[0].data_ptr() in self.host:
            return func(*args, **(kwargs or {}))
        if func is LOCAL_SCALAR:
            self.syncs += 1
            if self.fail:
                stack = "".join(traceback.format_stack(limit=14)[:-1])
                raise HostSyncError(f"device→host sync ({func}) at:\n{stack}")
        else:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def adam_step_counters(opt: torch.optim.Optimizer) -> list:
    """The host-resident step counters of a (non-capturable) Adam."""
    return [st["step"] for st in opt.state.values() if isinstance(st.get("step"), torch.Tensor)]
