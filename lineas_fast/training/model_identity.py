"""What the ranks of a job compare to know they hold the same model (``Ranks.agree``).

``model_identity(root)`` gives two sha256 digests:

* **structure**: every parameter's name, shape and dtype, in ``named_parameters()`` order;
* **values**: ``SAMPLES`` values of every parameter at evenly spaced positions of its flattened
  tensor (the first and the last included), as float32, with the parameter's name. A stale or
  fine-tuned checkpoint of the same architecture changes them; the cost is one small gather per
  parameter and one copy of ``SAMPLES`` × parameters floats to the host, not a pass over the
  weights. None when every parameter is on the meta device: under FSDP such a rank receives
  rank 0's weights by broadcast, so its values are rank 0's by construction and are not
  compared. Parameters on the meta device (offloaded) and DTensor shards (a model already
  sharded, whose local values differ per rank by design) are left out of the values.
"""

from __future__ import annotations

import hashlib
import json

import torch

#: values read from each parameter
SAMPLES = 64


@torch.no_grad()
def model_identity(root: torch.nn.Module) -> tuple[str, str | None]:
    """(structure digest, values digest or None) of ``root``'s parameters (module docstring)."""
    named = list(root.named_parameters())
    structure = [(n, list(p.shape), str(p.dtype)) for n, p in named]
    held = [(n, p) for n, p in named if not p.is_meta and not _is_dtensor(p)]
    values = None
    if held or not named:
        h = hashlib.sha256(json.dumps([n for n, _ in held]).encode())
        parts = []
        for _, p in held:
            flat = p.detach().reshape(-1)
            k = min(SAMPLES, flat.numel())
            # integer positions: a float32 linspace rounds the last index of a tensor of more than
            # 2**24 values (an embedding) past its end
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            parts.append(flat[idx].float())
        if parts:
            h.update(torch.cat([x.cpu() for x in parts]).numpy().tobytes())
        values = h.hexdigest()
    return hashlib.sha256(json.dumps(structure).encode()).hexdigest(), values


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)
