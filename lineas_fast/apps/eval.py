"""Reusable evaluation helpers: continuations, toxicity and perplexity."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 32,
    progress: bool = False,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """Greedy continuations (text after the prompt), left-padded batches; ``generate_kwargs``
    (e.g. sampling settings, ``apps.decoding``) are passed on to ``model.generate``."""

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate", leave=False):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            settings = {"do_sample": False, **(generate_kwargs or {})}
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **settings
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def toxicity(
    texts: Sequence[str], judge: Callable[[Sequence[str]], Sequence[float]], threshold: float = 0.5
) -> dict:
    """{"rate": fraction with judge probability ≥ threshold, "mean_prob": mean probability}."""
    if not texts:
        raise ValueError("toxicity of an empty list of texts")
    probs = [float(p) for p in judge(texts)]
    return {"rate": sum(p >= threshold for p in probs) / len(probs), "mean_prob": sum(probs) / len(probs)}


@torch.no_grad()
def text_nll(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
    prefix: str | None = None,
) -> tuple[list[float], list[int]]:
    """([summed negative log-likelihood of each text's predicted tokens], [their counts]): each
    text truncated to ``max_length`` tokens, padding excluded, sums in float64. With ``prefix``
    (e.g. an instruction) each text is read after it, and exactly the tokens scored without it
    are scored (the prefix is context, never scored)."""

    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    nll, count = [], []
    try:
        for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="perplexity", leave=False):
            batch = list(texts[i : i + batch_size])
            if prefix is None:
                enc = tokenizer(
                    batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length
                )
                scored = enc["attention_mask"][:, 1:].bool()
            else:
                enc, scored = _after_prefix(tokenizer, batch, prefix, max_length)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            mask = scored.to(target.device)
            lp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll += (-torch.where(mask, lp.double(), 0.0)).sum(1).tolist()
            count += mask.sum(1).tolist()
    finally:
        tokenizer.padding_side = side
    return nll, count


def _after_prefix(tokenizer, batch: list[str], prefix: str, max_length: int):
    """Right-padded ids of ``prefix`` + each text (the text's own leading BOS dropped when the
    prefix starts with it) and the (B, L − 1) mask of the shifted targets that are the text's
    tokens after its first, as scored without a prefix."""
    pre = tokenizer(prefix)["input_ids"]
    rows, keep = [], []
    for text in batch:
        plain = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        bos = tokenizer.bos_token_id
        drop = 1 if bos is not None and pre and plain and pre[0] == bos and plain[0] == bos else 0
        rows.append(pre + plain[drop:])
        first = len(pre) - drop  # where plain[0] sits in the row
        keep.append(range(first, first + len(plain) - 1))  # targets plain[1:], shifted by one
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for b, (r, k) in enumerate(zip(rows, keep)):
        ids[b, : len(r)] = torch.tensor(r)
        attn[b, : len(r)] = 1
        scored[b, list(k)] = True
    return {"input_ids": ids, "attention_mask": attn}, scored


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``texts``, each truncated to
    ``max_length`` tokens; padding excluded (``text_nll`` pooled)."""
    nll, count = text_nll(model, tokenizer, texts, max_length, batch_size, progress)
    if sum(count) == 0:
        raise ValueError("perplexity: no predicted tokens (texts too short)")
    return math.exp(sum(nll) / sum(count))
