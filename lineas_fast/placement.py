"""Where a module's forward runs, for plain models and for models dispatched by accelerate.

A model loaded with ``device_map`` (``from_pretrained(..., device_map={...})`` or
``accelerate.dispatch_model``) may offload modules: with a GPU as the main device, modules
mapped to ``"cpu"`` (and, always, those mapped to ``"disk"``) keep their weights in CPU memory or
on disk and have them on the ``meta`` device between forwards; accelerate's ``AlignDevicesHook``
loads them onto its ``execution_device`` for each forward. A steering map must live where the
module's output is computed, so the device of a module is: its parameters' device when they are
real, else the execution device of the nearest accelerate hook on it or an ancestor.
"""

from __future__ import annotations

import torch
from torch import nn


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (an ``AlignDevicesHook``, alone
    or inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def _own_device(module: nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer, None if it has none or it is meta."""
    for t in list(module.parameters()) + list(module.buffers()):
        return None if t.device.type == "meta" else t.device
    return None


def device_of(module: nn.Module) -> torch.device | None:
    """Where ``module`` runs, from itself alone: its weights' device, else its own hook's."""
    return _own_device(module) or hook_device(module)


def module_device(named: dict[str, nn.Module], name: str) -> torch.device | None:
    """Where the module called ``name`` in ``named`` (``dict(root.named_modules())``) runs: its
    weights' device, else the hook execution device found on it or its nearest ancestor."""
    dev = _own_device(named[name])
    if dev is not None:
        return dev
    path = name
    while True:
        dev = hook_device(named[path]) if path in named else None
        if dev is not None:
            return dev
        if not path:
            return None
        path = path.rpartition(".")[0]


def input_device(root: nn.Module) -> torch.device | None:
    """Where a model's inputs go: the device of the first module (in ``modules()`` order) that
    has weights on a real device or an accelerate execution device (the embedding, for a
    language model), None for a model without either."""
    for m in root.modules():
        dev = hook_device(m)
        if dev is not None:
            return dev
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return None


def offloaded(module: nn.Module) -> bool:
    """True when some of the module's weights are on the meta device (offloaded by accelerate,
    or never materialised)."""
    return any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers()))
