"""What one sample is (SPEC §1): pooling a module's output into one vector per sentence or image.

* ``masked_mean``: a token stream (B, T, d) averaged over each sentence's real tokens.
* ``pool_image``: a UNet feature map (B, C, H, W) averaged over H×W (channels are the
  coordinates); token-shaped outputs (B, T, C) of the UNet's transformer blocks over T.
* ``length_buckets``: groups sentences of similar length so batches carry little padding.
"""
from __future__ import annotations

from typing import Sequence

import torch


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h (B, T, d), mask (B, T) of 0/1 → (B, d) float32 mean over real tokens."""
    m = mask.to(device=h.device, dtype=torch.float32).unsqueeze(-1)
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool_image(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → mean over H, W; (B, T, C) → mean over T; (B, C) unchanged. float32."""
    if h.ndim == 4:
        return h.float().mean((2, 3))
    if h.ndim == 3:
        return h.float().mean(1)
    return h.float()


def length_buckets(lengths: Sequence[int], max_waste: float = 0.25) -> list[list[int]]:
    """Group indices of sentences (sorted by length) so that each group's padded tokens are at
    most (1 + max_waste) × its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets, cur, real = [], [], 0
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > (1 + max_waste) * (real + lengths[i]):
            buckets.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        buckets.append(cur)
    return buckets
