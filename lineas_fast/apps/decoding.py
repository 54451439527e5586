"""How continuations are decoded for the quality evaluation: the LinEAS paper's sampling
(temperature 1.0, top-p 0.3, repetition penalty 1.2, 32 new tokens; top-k off) by default, or
greedy decoding; each sampled run under its own generation seed.

    texts = decode(model, tok, prompts, Decoding(), seed=1)        # sampled, reproducible per seed
    texts = decode(model, tok, prompts, Decoding.greedy(20))        # greedy: the seed changes nothing

Reproducible: the same prompts, batch size, model, device and seed give the same texts (the seed
is set for the call in a forked RNG, so the caller's global RNG is left as it was). A prompt's
sample depends on the others in its batch (one RNG stream per batch), so changing ``batch_size``
changes the samples, not their distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lineas_fast.apps.eval import continuations
from lineas_fast.checks import choice, integer, number

MODES = ("sampled", "greedy")


@dataclass(frozen=True)
class Decoding:
    """``mode`` "sampled" (the paper's settings by default) or "greedy" (no sampling; the
    repetition penalty still applies when set > 1)."""

    mode: str = "sampled"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.3
    repetition_penalty: float = 1.2

    @classmethod
    def greedy(cls, max_new_tokens: int = 20) -> "Decoding":
        """Plain greedy decoding (no repetition penalty): the earlier sweeps' decoding."""
        return cls("greedy", max_new_tokens, repetition_penalty=1.0)

    def check(self) -> "Decoding":
        choice(self.mode, "decoding", MODES)
        integer(self.max_new_tokens, "max_new_tokens", low=1)
        number(self.temperature, "temperature", low=0, low_open=True)
        number(self.top_p, "top_p", low=0, low_open=True, high=1)
        number(self.repetition_penalty, "repetition_penalty", low=0, low_open=True)
        return self

    def settings(self) -> dict:
        """What a result records: every field for sampling, the ones that act for greedy."""
        d = asdict(self)
        if self.mode == "greedy":
            d.pop("temperature")
            d.pop("top_p")
        return d

    def generate_kwargs(self) -> dict:
        if self.mode == "greedy":
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
            "repetition_penalty": self.repetition_penalty,
        }


def decode(
    model,
    tokenizer,
    prompts: Sequence[str],
    decoding: Decoding = Decoding(),
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """The continuation (text after the prompt) of each prompt under ``decoding``, sampled with
    generation seed ``seed``."""
    decoding.check()
    integer(seed, "seed", low=0)
    device = getattr(model, "device", torch.device("cpu"))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return continuations(
            model,
            tokenizer,
            prompts,
            decoding.max_new_tokens,
            batch_size,
            progress,
            generate_kwargs=decoding.generate_kwargs(),
        )
