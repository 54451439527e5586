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
) -> list[str]:
    """Greedy continuations (text after the prompt), left-padded batches."""

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate", leave=False):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
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
def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``texts``, each truncated to
    ``max_length`` tokens; padding excluded."""

    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="perplexity", leave=False):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            enc = {k: v.to(model.device) for k, v in enc.items()}
            logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll -= lp[mask].sum().item()
            count += int(mask.sum())
    finally:
        tokenizer.padding_side = side
    if count == 0:
        raise ValueError("perplexity: no predicted tokens (texts too short)")
    return math.exp(nll / count)
