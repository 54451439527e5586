"""Validation and test prompts: what chooses (a strength, a recipe) is never what is reported.

``split_prompts(prompts, n_validation, n_test, seed, held_out_from=training texts)`` drops
duplicates and every prompt that is, or is a prefix of, a training text, shuffles the rest with
``random.Random(seed)`` and returns the first ``n_validation`` and the next ``n_test``: disjoint,
deterministic for a seed, and held out from training.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from lineas_fast.checks import ArgumentError, integer


def split_prompts(
    prompts: Sequence[str],
    n_validation: int,
    n_test: int,
    seed: int = 0,
    held_out_from: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """(validation prompts, test prompts): disjoint, none of them a training text or a prefix of
    one (``held_out_from``), drawn with ``random.Random(seed)``."""
    integer(n_validation, "n_validation", low=1)
    integer(n_test, "n_test", low=1)
    integer(seed, "seed", low=0)
    training = list(held_out_from)
    unique = list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))
    usable = [p for p in unique if not any(t.startswith(p) for t in training)]
    if len(usable) < n_validation + n_test:
        raise ArgumentError(
            f"n_validation={n_validation} + n_test={n_test} prompts asked, but {len(usable)} distinct "
            f"prompts are held out from training (of {len(prompts)} given)",
            "n_test",
        )
    order = random.Random(seed).sample(usable, len(usable))
    return order[:n_validation], order[n_validation : n_validation + n_test]
