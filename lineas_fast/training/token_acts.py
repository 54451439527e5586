"""Per-token reads of a causal LM (token-level DSAS gates, gate openings).

``padded_batches`` groups token-id lists into right-padded batches with a 2-D attention mask;
``token_activations`` runs the untouched model over them with forward hooks at the named modules
and keeps the module outputs at chosen real tokens (never padding), the forward stopped right
after the last module read.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lineas_fast.pooling import length_buckets, pad_right
from lineas_fast.targets import LanguageModelTarget, StopForward


def language_model_target(target, what: str) -> LanguageModelTarget:
    """``target`` if it reads a causal LM's tokens, else a ValueError naming ``what`` needs it."""
    if not isinstance(target, LanguageModelTarget) or target.tokenizer is None:
        raise ValueError(
            f"{what} reads per-token activations of a causal language model with "
            f"its tokenizer; got {type(target.original).__name__}"
            f"{'' if getattr(target, 'tokenizer', None) else ' without a tokenizer'}"
        )
    return target


def padded_batches(
    encoded: Sequence[Sequence[int]], pad_id: int, device, max_tokens: int = 4096
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (sentence indices, ids (B, T) long, mask (B, T) long) over length buckets of at
    most ``max_tokens`` padded tokens per batch (at least one sentence); right padding."""
    for bucket in length_buckets([len(e) for e in encoded]):
        T = max(len(encoded[i]) for i in bucket)
        step = max(1, max_tokens // max(T, 1))
        for lo in range(0, len(bucket), step):
            rows = bucket[lo : lo + step]
            ids, mask = pad_right([encoded[i] for i in rows], pad_id)
            yield rows, ids.to(device), mask.to(device)


def token_positions(lengths: Sequence[int], cap: int | None, seed: int = 0) -> torch.Tensor:
    """(n, 2) long (sentence, position) pairs: every token of sentences of ``lengths``, or a
    seeded random subset of ``cap`` of them, sorted."""
    pairs = torch.tensor([(s, t) for s, n in enumerate(lengths) for t in range(n)], dtype=torch.long).reshape(
        -1, 2
    )
    if cap is not None and len(pairs) > cap:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(pairs), generator=g)[:cap].sort().values
        pairs = pairs[keep]
    return pairs


@torch.no_grad()
def token_activations(
    target: LanguageModelTarget,
    encoded: Sequence[Sequence[int]],
    names: Sequence[str],
    positions: torch.Tensor | None = None,
    max_tokens: int = 4096,
) -> dict[str, torch.Tensor]:
    """{module: (n, d) float32 on the CPU}: the untouched model's output at each module in
    ``names`` at the tokens ``positions`` ((n, 2) (sentence, position) pairs, rows in that
    order; default every real token, sentence by sentence). The caller freezes the model
    (``target.frozen()``) and makes sure nothing is attached to it."""
    names = list(names)
    target.require(names)
    if positions is None:
        positions = token_positions([len(e) for e in encoded], None)
    positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1, 2)
    lengths = [len(e) for e in encoded]
    bad = [(s, t) for s, t in positions.tolist() if not (0 <= s < len(lengths) and 0 <= t < lengths[s])]
    if bad:
        raise ValueError(
            f"positions: (sentence, position) pairs {bad[:5]} are outside the "
            f"{len(lengths)} encoded sentences"
        )
    wanted_sentences = sorted(set(positions[:, 0].tolist()))
    out: dict[str, torch.Tensor | None] = {n: None for n in names}
    state: dict = {"rows": None, "cols": None, "dest": None, "seen": set()}

    def hook_for(name):
        def hook(_mod, _args, o):
            h = o[0] if isinstance(o, (tuple, list)) else o
            vals = h[state["rows"], state["cols"]].detach().float().cpu()
            if out[name] is None:
                out[name] = torch.empty(len(positions), h.shape[-1])
            out[name][state["dest"]] = vals
            state["seen"].add(name)
            if state["seen"] == set(names):
                raise StopForward

        return hook

    named = target.named
    handles = [named[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        sub = [encoded[i] for i in wanted_sentences]
        for rows, ids, mask in padded_batches(sub, target.pad_id, target.device, max_tokens):
            sent = torch.tensor([wanted_sentences[r] for r in rows], dtype=torch.long)
            hit = positions[:, 0][:, None] == sent[None, :]  # (n, B)
            dest = hit.any(1).nonzero().flatten()
            state.update(
                rows=hit[dest].float().argmax(1).to(ids.device),
                cols=positions[dest, 1].to(ids.device),
                dest=dest,
                seen=set(),
            )
            with target.autocast():
                try:
                    target.root(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
            if state["seen"] != set(names):
                raise ValueError(
                    f"modules {sorted(set(names) - state['seen'])[:5]} did not run "
                    f"in the forward pass of {type(target.root).__name__}"
                )
    finally:
        for h in handles:
            h.remove()
    return {n: (v if v is not None else torch.empty(0, 0)) for n, v in out.items()}
