"""Reading mean-pooled activations of a causal LM at chosen modules (SPEC §1).

One sample is one sentence: the module's output (B, T, d) averaged over the sentence's real
tokens (the attention mask; right or left padding). Batches are length-bucketed so little
compute goes to padding, and the forward stops right after the last module read.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass after the last module needed."""


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h (B, T, d), mask (B, T) of 0/1 → (B, d) float32 mean over real tokens."""
    m = mask.to(device=h.device, dtype=torch.float32).unsqueeze(-1)
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


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


def check_texts(texts, what: str) -> list[str]:
    """The texts as a list, or a ValueError naming the empty list or the bad entries."""
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what}: empty list of {'prompts' if 'prompt' in what else 'sentences'}")
    bad = [i for i, s in enumerate(texts) if not isinstance(s, str) or not s.strip()]
    if bad:
        raise ValueError(f"{what}: entries {bad[:10]} are empty or not strings")
    return texts


class ActivationReader:
    """Tokenizes sentences once and returns pooled activations at named modules.

    Args:
        model: a transformers causal LM (or any module taking input_ids/attention_mask).
        tokenizer: its tokenizer.
        max_length: sentences are truncated to this many tokens.
        autocast_dtype: e.g. torch.bfloat16 to run the forward under autocast.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 128,
                 autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.autocast_dtype = max_length, autocast_dtype
        self.modules = dict(model.named_modules())
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)

    @property
    def device(self) -> torch.device:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        p = emb.weight if emb is not None else next(self.model.parameters())
        return p.device

    def encode(self, sentences: Iterable[str], what: str = "sentences") -> list[list[int]]:
        sentences = check_texts(sentences, what)
        ids = self.tokenizer(sentences, truncation=True, max_length=self.max_length,
                             add_special_tokens=True)["input_ids"]
        return [list(x) for x in ids]

    def _batch(self, encoded: list[list[int]], idx: list[int]):
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, :len(encoded[i])] = 1
        return ids.to(self.device), mask.to(self.device)

    def pooled(self, encoded: list[list[int]], names: Sequence[str],
               idx: Sequence[int] | None = None, stop: bool = True) -> dict[str, torch.Tensor]:
        """Pooled (len(idx), d) float32 activations at each module in ``names``, rows in the
        order of ``idx``. Gradients flow when the caller has grad enabled."""
        idx = list(range(len(encoded))) if idx is None else list(idx)
        rows = {n: [None] * len(idx) for n in names}
        state = {"mask": None, "rows": None, "seen": set()}
        wanted = set(names)

        def hook_for(name):
            def hook(_mod, _args, out):
                h = out[0] if isinstance(out, (tuple, list)) else out
                pooled = masked_mean(h, state["mask"])
                for r, p in zip(state["rows"], pooled):
                    rows[name][r] = p
                state["seen"].add(name)
                if stop and state["seen"] == wanted:      # every module read: skip the rest
                    raise StopForward
            return hook

        missing = [n for n in names if n not in self.modules]
        if missing:
            raise ValueError(f"modules {missing} not found in the model")
        handles = [self.modules[n].register_forward_hook(hook_for(n)) for n in names]
        lengths = [len(encoded[i]) for i in idx]
        try:
            for bucket in length_buckets(lengths):
                ids, mask = self._batch(encoded, [idx[b] for b in bucket])
                state.update(mask=mask, rows=bucket, seen=set())
                with self._autocast():
                    try:
                        self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except StopForward:
                        pass
                if state["seen"] != wanted:
                    raise ValueError(f"modules {sorted(wanted - state['seen'])} did not run in "
                                     f"the forward pass")
        finally:
            for h in handles:
                h.remove()
        return {n: torch.stack(rows[n]) for n in names}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
