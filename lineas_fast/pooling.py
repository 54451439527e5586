"""What one sample is (SPEC §1): pooling a module's output into one vector per sentence or image.

* ``masked_mean``: a token stream (B, T, d) averaged over each sentence's real tokens.
* ``pool_image``: a UNet feature map (B, C, H, W) averaged over H×W (channels are the
  coordinates); token-shaped outputs (B, T, C) of the UNet's transformer blocks over T.
* ``length_buckets``: groups sentences of similar length so batches carry little padding;
  ``pad_right``: one such group as right-padded ids and a 0/1 attention mask.
* ``pack_rows`` / ``segment_means``: sentences packed end to end into rows (first-fit
  decreasing), and the (n, R·L) matrix whose product with the packed stream is each sentence's
  mean: one matmul pools a whole packed batch, rows in the caller's order.
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


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → (ids (B, T) long, right-padded with ``pad_id``; mask (B, T) long, 1 on
    real tokens), T the longest length. On the CPU."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[r, : len(x)] = 1
    return ids, mask


def pack_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` placed in rows whose summed length is at most
    ``capacity`` (default: the longest length, so the longest sentence fills a row alone). Each
    row lists its sentences in placement order (longest first; ties by index). Deterministic."""
    if not lengths:
        return []
    cap = max(lengths) if capacity is None else int(capacity)
    if cap < max(lengths):
        raise ValueError(f"capacity={cap} is shorter than the longest sentence ({max(lengths)} tokens)")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(cap - lengths[i])
    return rows


def segment_means(starts: Sequence[int], lengths: Sequence[int], total: int, device=None) -> torch.Tensor:
    """(n, total) float32 matrix W with W[k, starts[k]:starts[k] + lengths[k]] = 1/lengths[k]
    and 0 elsewhere: ``W @ h.reshape(total, d)`` is the mean of each segment of a flattened
    stream (n = len(starts); segments are disjoint spans of the flattened (R, L) positions)."""
    if len(starts) != len(lengths):
        raise ValueError(f"starts ({len(starts)}) and lengths ({len(lengths)}) differ in length")
    w = torch.zeros(len(starts), total, dtype=torch.float32)
    for k, (s, n) in enumerate(zip(starts, lengths)):
        if n < 1 or s < 0 or s + n > total:
            raise ValueError(f"segment {k} = [{s}, {s + n}) is empty or outside [0, {total})")
        w[k, s : s + n] = 1.0 / n
    return w if device is None else w.to(device)
