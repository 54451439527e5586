"""95% confidence intervals for the quality sweep: a hierarchical percentile bootstrap over
training draws and, within each draw, evaluation units (prompts, or perplexity texts).

The data of one row is an array ``values`` of shape (draws, units) — or (draws, seeds, units),
averaged over the generation seeds first, so a prompt's value is its mean over the seeds (seeds
are not resampled: they are repeated measurements of the same prompt). One bootstrap replicate:

1. draw D draws with replacement from the D draws;
2. for each drawn draw, draw U units with replacement from its U units;
3. compute the statistic on the resampled (D, U) array (for a mean: the mean of all its values).

The interval is the (1 − level)/2 and (1 + level)/2 percentiles of ``n_boot`` replicates (numpy's
default linear interpolation); the point estimate is the statistic on the data itself. The random
numbers come from ``numpy.random.default_rng(seed)``: all draw indices (n_boot, D) first, then all
unit indices (n_boot, D, U), so a result is reproducible from its seed. With one draw the interval
covers prompt-to-prompt variation only, and the record says ``n_draws = 1``.

Ratios to the unsteered row are paired: the unsteered model is evaluated on the same units, so each
replicate resamples the same unit indices for both and divides the statistics (the unsteered row
has no training draws: its values, (units,) or (seeds, units), serve every draw). A replicate whose
unsteered statistic is 0 gives an unbounded ratio (inf; 0/0 too), reported as None.
Perplexity is exp(Σ NLL / Σ tokens) over the resampled texts, not a mean of per-text perplexities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lineas_fast.checks import ArgumentError, integer, number

METHOD = "percentile bootstrap: draws resampled, then units (prompts or texts) within each draw"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval and what it rests on."""

    mean: float
    low: float
    high: float
    level: float
    n_draws: int
    n_units: int
    n_boot: int
    seed: int
    method: str = METHOD

    def as_dict(self) -> dict:
        """JSON-able; a bound that is not finite (a ratio whose unsteered statistic was 0 in some
        replicates) is None: unbounded."""
        d = asdict(self)
        for k in ("mean", "low", "high"):
            if not np.isfinite(d[k]):
                d[k] = None
        return d


def _as_draws_units(values, name: str) -> np.ndarray:
    """``values`` as a float64 (draws, units) array (a (draws, seeds, units) one averaged over
    seeds); every value finite."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=1)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ArgumentError(
            f"{name} must be (draws, units) or (draws, seeds, units) with at least one of each, got "
            f"shape {tuple(np.shape(values))}",
            name,
        )
    if not np.isfinite(a).all():
        raise ArgumentError(f"{name} holds values that are not finite", name)
    return a


def _as_base(base, n_draws: int, n_units: int, name: str) -> np.ndarray:
    """The unsteered values, (units,) or (seeds, units) (averaged over seeds), as the same
    (n_draws, n_units) array for every draw."""
    b = np.asarray(base, dtype=np.float64)
    if b.ndim == 2:
        b = b.mean(axis=0)
    if b.ndim != 1 or b.shape[0] != n_units:
        raise ArgumentError(
            f"{name} must be (units,) or (seeds, units) with the row's {n_units} units (a paired "
            f"ratio needs the same units), got shape {tuple(np.shape(base))}",
            name,
        )
    if not np.isfinite(b).all():
        raise ArgumentError(f"{name} holds values that are not finite", name)
    return np.broadcast_to(b, (n_draws, n_units))


def resample_indices(n_draws: int, n_units: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(draw indices (n_boot, n_draws), unit indices (n_boot, n_draws, n_units)) from
    ``default_rng(seed)``, in that order."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_draws, size=(n_boot, n_draws))
    units = rng.integers(0, n_units, size=(n_boot, n_draws, n_units))
    return draws, units


def _gather(a: np.ndarray, draws: np.ndarray, units: np.ndarray) -> np.ndarray:
    """a[draws[b, i], units[b, i, j]] as (n_boot, n_draws, n_units)."""
    return a[draws[:, :, None], units]


def _checked(level, n_boot, seed) -> tuple[float, int, int]:
    level = number(level, "level", low=0, low_open=True)
    if level >= 1:
        raise ArgumentError(f"level must be < 1, got {level!r}", "level")
    return level, integer(n_boot, "n_boot", low=100), integer(seed, "seed", low=0)


def _interval(point: float, reps: np.ndarray, level: float, shape, n_boot: int, seed: int) -> Interval:
    reps = np.where(np.isnan(reps), np.inf, reps)  # 0/0: undefined, counted as unbounded
    with np.errstate(invalid="ignore"):  # inf - inf when interpolating between unbounded replicates
        low, high = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(point), float(low), float(high), level, shape[0], shape[1], n_boot, seed)


def mean_interval(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """The mean of ``values`` ((draws, units) or (draws, seeds, units)) with its hierarchical
    bootstrap interval (module docstring)."""
    level, n_boot, seed = _checked(level, n_boot, seed)
    a = _as_draws_units(values, "values")
    d, u = resample_indices(*a.shape, n_boot, seed)
    reps = _gather(a, d, u).mean(axis=(1, 2))
    return _interval(a.mean(), reps, level, a.shape, n_boot, seed)


def ratio_interval(values, base, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """mean(``values``) / mean(``base``) with its paired bootstrap interval: ``base`` holds the
    unsteered model's values on the same units ((units,), (seeds, units) or (draws, units))."""
    level, n_boot, seed = _checked(level, n_boot, seed)
    a = _as_draws_units(values, "values")
    b = _as_base(base, *a.shape, "base")
    if b.mean() == 0:
        raise ArgumentError("base has mean 0: the ratio to it is undefined", "base")
    d, u = resample_indices(*a.shape, n_boot, seed)
    num, den = _gather(a, d, u).mean(axis=(1, 2)), _gather(b, d, u).mean(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = num / den
    return _interval(a.mean() / b.mean(), reps, level, a.shape, n_boot, seed)


def _ppl_arrays(nll, tokens, name: str):
    n = _as_draws_units(nll, f"{name}nll")
    t = _as_draws_units(tokens, f"{name}tokens")
    if n.shape != t.shape or (t <= 0).any():
        raise ArgumentError(
            f"{name}nll {n.shape} and {name}tokens {t.shape} must have one shape, every token count > 0",
            f"{name}tokens",
        )
    return n, t


def perplexity_interval(nll, tokens, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """exp(Σ nll / Σ tokens) with its bootstrap interval; ``nll`` and ``tokens``: (draws, texts),
    each text's summed negative log-likelihood and its count of predicted tokens."""
    level, n_boot, seed = _checked(level, n_boot, seed)
    n, t = _ppl_arrays(nll, tokens, "")
    d, u = resample_indices(*n.shape, n_boot, seed)
    reps = np.exp(_gather(n, d, u).sum(axis=(1, 2)) / _gather(t, d, u).sum(axis=(1, 2)))
    return _interval(np.exp(n.sum() / t.sum()), reps, level, n.shape, n_boot, seed)


def perplexity_ratio_interval(
    nll, tokens, base_nll, base_tokens, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Interval:
    """PPL / unsteered PPL on the same texts, paired (``base_nll``, ``base_tokens``: (texts,))."""
    level, n_boot, seed = _checked(level, n_boot, seed)
    n, t = _ppl_arrays(nll, tokens, "")
    bn, bt = _as_base(base_nll, *n.shape, "base_nll"), _as_base(base_tokens, *n.shape, "base_tokens")
    if (bt <= 0).any():
        raise ArgumentError("base_tokens must all be > 0", "base_tokens")
    d, u = resample_indices(*n.shape, n_boot, seed)

    def log_ppl(x, y):  # per replicate: Σ nll / Σ tokens over the resampled texts
        return _gather(x, d, u).sum(axis=(1, 2)) / _gather(y, d, u).sum(axis=(1, 2))

    point = np.exp(n.sum() / t.sum() - bn.sum() / bt.sum())
    return _interval(point, np.exp(log_ppl(n, t) - log_ppl(bn, bt)), level, n.shape, n_boot, seed)
