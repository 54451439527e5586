"""A strength for a perplexity budget: ``lf.calibrate_strength`` (issue #31, item 3).

    λ* = the largest λ in [0, λ_max] found with  PPL(λ) ≤ PPL(0)·(1 + max_ppl_increase)

where PPL(λ) is ``apps.eval.perplexity`` of the model with the steering attached at strength λ
(PPL(0), the unsteered model, is computed once). The search:

1. the upper end. With ``max_strength`` given: PPL(max_strength); within the budget, that is the
   answer (nothing above it is tried). Without: λ = 1, 2, 4, … (up to 1024, within
   ``max_evaluations``) until one is over the budget, never beyond the steering's numeric limit
   on this model (the largest λ whose coefficients a = 1 − λ + λω and c = λb stay within
   ``numerics.coefficient_bound`` of the model's dtype); if every one is within the budget, the
   last is the answer (the record says no over-budget strength was found).
2. bisection between the largest λ within the budget (``lo``, starting at 0 or the last doubling
   within it) and the smallest over it (``hi``): the midpoint replaces ``lo`` when it is within
   the budget, ``hi`` otherwise, until ``hi − lo ≤ rtol·hi`` or ``max_evaluations`` steered
   evaluations have been spent. The answer is ``lo``.

Not monotone. Nothing assumes PPL(λ) rises with λ, but the bisection only looks where it goes:
the answer is always the largest λ *evaluated* that met the budget, and ``hi`` (when found) an
evaluated λ above it that did not, at most ``rtol·hi`` away. A λ below the answer that was never
evaluated may exceed the budget, and a λ above ``hi`` may meet it again; the record's
``evaluations`` lists every (λ, PPL) measured so a caller can see the path. A perplexity that
is not finite (the steered model overflowed) counts as over the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from lineas_fast.apps.eval import perplexity
from lineas_fast.checks import ArgumentError, ArgumentTypeError, integer, number
from lineas_fast.numerics import coefficient_bound, module_dtype
from lineas_fast.steering import Steering
from lineas_fast.targets import as_target


@dataclass
class StrengthCalibration:
    """What ``calibrate_strength(..., return_record=True)`` measured.

    ``strength``: the answer; ``perplexity``: PPL at it; ``base_perplexity``: PPL unsteered;
    ``limit``: the perplexity allowed, base·(1 + max_ppl_increase); ``over_budget_strength``: the
    smallest evaluated λ above ``strength`` that exceeded the limit (None: none found up to the
    upper end); ``evaluations``: every steered (λ, PPL) in the order measured; ``n_texts``: how
    many perplexity texts."""

    strength: float
    perplexity: float
    base_perplexity: float
    max_ppl_increase: float
    limit: float
    over_budget_strength: Optional[float]
    evaluations: list = field(default_factory=list)
    n_texts: int = 0

    def metadata(self) -> dict:
        """A JSON-able form for a steering file's metadata (non-finite PPL as None)."""
        d = asdict(self)
        d["evaluations"] = [[lam, ppl if math.isfinite(ppl) else None] for lam, ppl in self.evaluations]
        return d


def strength_limit(steering: Steering, dtype: torch.dtype) -> float:
    """The largest λ ≥ 0 whose effective coefficients a = 1 + λ(ω − 1), c = λb stay within
    ``coefficient_bound(dtype)`` for every map (inf when every map is the identity)."""
    bound = coefficient_bound(dtype)
    top = math.inf
    for name in steering.modules:
        om, b = (t.detach().double().cpu() for t in steering[name])
        u = om - 1.0
        up, down, shift = float(u.clamp(min=0).max()), float((-u).clamp(min=0).max()), float(b.abs().max())
        for size, room in ((up, bound - 1.0), (down, bound + 1.0), (shift, bound)):
            if size > 0:
                top = min(top, room / size)
    return top


def search_strength(
    ppl_at: Callable[[float], float],
    limit: float,
    max_strength: Optional[float] = None,
    ceiling: float = math.inf,
    rtol: float = 0.05,
    max_evaluations: int = 12,
    max_doublings: int = 10,
) -> tuple[float, Optional[float], list]:
    """The search of the module docstring over any function ``ppl_at(λ) -> perplexity``, with
    PPL(0) ≤ ``limit`` taken as given. Returns (answer, smallest evaluated λ over the limit above
    it or None, [(λ, PPL), ...] in the order evaluated)."""
    evaluations: list = []

    def within(lam: float) -> bool:
        ppl = ppl_at(lam)
        evaluations.append((lam, ppl))
        return math.isfinite(ppl) and ppl <= limit

    lo, hi = 0.0, None
    if max_strength is not None:
        if within(max_strength):
            return max_strength, None, evaluations
        hi = max_strength
    else:
        lam = min(1.0, ceiling)
        for _ in range(max_doublings + 1):
            if len(evaluations) >= max_evaluations:
                break
            if not within(lam):
                hi = lam
                break
            lo = lam
            if lam >= ceiling:
                break
            lam = min(2.0 * lam, ceiling)
        if hi is None:
            return lo, None, evaluations
    while len(evaluations) < max_evaluations and hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, evaluations


def calibrate_strength(
    steering: Steering,
    model,
    tokenizer,
    texts: Sequence[str],
    max_ppl_increase: float = 0.03,
    *,
    max_strength: Optional[float] = None,
    rtol: float = 0.05,
    max_evaluations: int = 12,
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
    return_record: bool = False,
):
    """The largest strength λ found whose perplexity on ``texts`` is at most (1 +
    ``max_ppl_increase``) × the unsteered perplexity (bisection over λ; the module docstring
    says how, and what happens when perplexity is not monotone in λ).

    Args:
        steering: a ``Steering`` for ``model`` (not attached; the model carries no other).
        model, tokenizer: a causal LM and its tokenizer.
        texts: held-out texts (not the training sentences), each truncated to ``max_length``
            tokens (``apps.eval.perplexity``).
        max_ppl_increase: the budget as a fraction (0.03: +3%), > 0.
        max_strength: the upper end of the search (default: found by doubling from 1 up to the
            steering's numeric limit on this model).
        rtol: stop when the bracket [lo, hi] is narrower than ``rtol``·hi.
        max_evaluations: at most this many steered perplexity evaluations (plus one unsteered).
        return_record: return a ``StrengthCalibration`` instead of the float.

    Returns:
        λ (float ≥ 0), or the ``StrengthCalibration`` record.
    """
    if not isinstance(steering, Steering):
        raise ArgumentTypeError(
            f"steering must be a lineas_fast.Steering, got {type(steering).__name__}", "steering"
        )
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ArgumentTypeError(
            f"texts must be a list of strings, got {type(texts).__name__} {str(texts)[:40]!r}", "texts"
        )
    if len(texts) == 0:
        raise ArgumentError("texts is empty: perplexity needs at least one text", "texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ArgumentError(f"texts[{i}] must be a non-blank string, got {t!r:.40}", "texts")
    budget = number(max_ppl_increase, "max_ppl_increase", low=0, low_open=True)
    number(rtol, "rtol", low=0, low_open=True, high=1)
    integer(max_evaluations, "max_evaluations", low=1)
    integer(max_length, "max_length", low=2)
    integer(batch_size, "batch_size", low=1)
    if max_strength is not None:
        max_strength = number(max_strength, "max_strength", low=0, low_open=True)
    target = as_target(model)
    steering.validate(target)
    ceiling = strength_limit(steering, module_dtype(target.root))
    if max_strength is not None and max_strength > ceiling:
        raise ArgumentError(
            f"max_strength={max_strength:g} is beyond this steering's numeric limit on the model "
            f"({ceiling:.4g}: the map's coefficients would overflow its dtype)",
            "max_strength",
        )

    def ppl(lam: float) -> float:
        try:
            if lam == 0.0:
                return perplexity(model, tokenizer, texts, max_length, batch_size, progress)
            with steering.apply(model, strength=lam):
                return perplexity(model, tokenizer, texts, max_length, batch_size, progress)
        except OverflowError:  # exp of a huge mean NLL
            return math.inf

    base = ppl(0.0)
    if not math.isfinite(base):
        raise ValueError(f"the unsteered model's perplexity on texts is {base}: cannot set a budget")
    limit = base * (1.0 + budget)
    lam, over, evaluations = search_strength(
        ppl, limit, max_strength, ceiling, rtol=rtol, max_evaluations=max_evaluations
    )
    if not return_record:
        return lam
    at = dict(evaluations).get(lam, base)
    return StrengthCalibration(lam, at, base, budget, limit, over, evaluations, len(texts))
