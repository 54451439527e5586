"""DSAS gates (SPEC §5): fitting g(z) = σ(w·z + c) per steered module, and measuring them.

The gate reads the module's output z at every token and scales the map's strength there. It is
fitted by an L2 logistic regression, source text labelled 1 and neutral control text 0, on the
first k principal components (Newton's method, float64), folded back into one vector w = Pᵀβ
and one scalar c so the gate costs one dot product per token. Two levels:

* ``level="sentence"`` (SPEC §5): one sample per sentence, the mean of its tokens' activations;
* ``level="token"``: one sample per real token (a seeded subsample of at most ``max_tokens`` per
  class), class-balanced weights, validation on the tokens of held-out sentences. A token gate
  sees what the gate sees when applied, so its decision boundary lies between source and control
  TOKENS rather than sentence means.

``control_opening=q`` then lowers c (and only lowers it) until the gate's mean opening over the
untouched model's control tokens is at most q: a selective gate that stays mostly shut on
neutral text. ``gate_openings`` measures the mean per-token strength λ·g while a steering is
applied, e.g. on Wikipedia and on the prompts to steer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lineas_fast.checks import choice, integer, number
from lineas_fast.steering import Steering
from lineas_fast.targets import as_target
from lineas_fast.training.distributed import agreed, settings_digest
from lineas_fast.training.distributed import setup as setup_ranks
from lineas_fast.training.token_acts import (
    language_model_target,
    padded_batches,
    token_activations,
    token_positions,
)


def logistic_regression(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iters: int = 50, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularized logistic regression by Newton's method. x (n, k), y (n,) in {0, 1},
    optional per-sample ``weights`` (n,) ≥ 0 on the log-likelihood terms. Returns (β (k,),
    β0 ()) float64; the intercept is not penalized."""
    x, y = x.double(), y.double()
    n, k = x.shape
    s = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta = torch.zeros(k + 1, dtype=torch.float64)
    reg = torch.full((k + 1,), float(l2), dtype=torch.float64)
    reg[-1] = 0.0
    for _ in range(iters):
        p = torch.sigmoid(xa @ theta)
        grad = xa.T @ (s * (p - y)) + reg * theta
        hess = xa.T @ (xa * (s * p * (1 - p))[:, None]) + torch.diag(reg) + 1e-9 * torch.eye(k + 1)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return theta[:k], theta[k]


def _fit_folded(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    k: int,
    l2: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA on the ``train`` rows of x (n, d) to k components, standardized, logistic regression,
    folded back: (w (d,), c ()) float64 with logit = x·w + c."""
    x = x.double()
    mu = x[train].mean(0)
    k = max(1, min(k, int(train.sum()) - 1, x.shape[1]))
    _, _, vh = torch.linalg.svd(x[train] - mu, full_matrices=False)
    proj = vh[:k]  # (k, d)
    feats = (x[train] - mu) @ proj.T
    scale = feats.std(0).clamp_min(1e-12)  # standardize for a well-posed L2
    beta, beta0 = logistic_regression(
        feats / scale, y[train], l2, weights=None if weights is None else weights[train]
    )
    w = proj.T @ (beta / scale)  # fold PCA, scaling and centering
    return w, beta0 - w @ mu


def fit_gate(
    src: torch.Tensor,
    ctrl: torch.Tensor,
    k: int = 5,
    l2: float = 1.0,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> dict:
    """Fit one gate on pooled activations src (n1, d) (label 1) and ctrl (n0, d) (label 0).

    Returns {"w": (d,) float32, "c": (1,) float32, "train_accuracy", "val_accuracy"}: the gate
    logit is w·z + c. With fewer than 4 samples per class there is no held-out split and the
    validation accuracy is the training accuracy.
    """
    if src.ndim != 2 or ctrl.ndim != 2 or src.shape[1] != ctrl.shape[1]:
        raise ValueError(
            f"source {tuple(src.shape)} and control {tuple(ctrl.shape)} activations "
            f"must be (n, d) with the same d"
        )
    if len(src) < 2 or len(ctrl) < 2:
        raise ValueError("fitting a gate needs at least 2 source and 2 control sentences")
    x = torch.cat([src, ctrl]).double()
    y = torch.cat([torch.ones(len(src)), torch.zeros(len(ctrl))]).double()
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(x), dtype=torch.bool)
    if min(len(src), len(ctrl)) >= 4 and val_fraction > 0:
        for lo, hi in ((0, len(src)), (len(src), len(x))):
            idx = torch.randperm(hi - lo, generator=g)[: max(1, int(val_fraction * (hi - lo)))] + lo
            val[idx] = True
    train = ~val
    w, c = _fit_folded(x, y, train, k, l2)
    pred = ((x @ w + c) > 0).double()
    acc = lambda m: float((pred[m] == y[m]).double().mean()) if m.any() else float("nan")
    train_acc = acc(train)
    return {
        "w": w.float(),
        "c": c.reshape(1).float(),
        "train_accuracy": train_acc,
        "val_accuracy": acc(val) if val.any() else train_acc,
    }


def fit_token_gate(
    src: torch.Tensor,
    ctrl: torch.Tensor,
    src_val: torch.Tensor | None = None,
    ctrl_val: torch.Tensor | None = None,
    k: int = 5,
    l2: float = 1.0,
) -> dict:
    """Fit one gate on token activations src (n1, d) (label 1) and ctrl (n0, d) (label 0), each
    class weighted to half the total weight. ``src_val`` (n1,) / ``ctrl_val`` (n0,) bool mark
    held-out tokens (those of validation sentences: tokens of one sentence are not independent).

    Returns {"w": (d,) float64, "c": (1,) float64, "train_accuracy", "val_accuracy"}; the
    accuracies are class-balanced (mean of the per-class accuracies), the validation one is the
    training one when nothing is held out.
    """
    if src.ndim != 2 or ctrl.ndim != 2 or src.shape[1] != ctrl.shape[1]:
        raise ValueError(
            f"source {tuple(src.shape)} and control {tuple(ctrl.shape)} token "
            f"activations must be (n, d) with the same d"
        )
    src_val = torch.zeros(len(src), dtype=torch.bool) if src_val is None else src_val.bool()
    ctrl_val = torch.zeros(len(ctrl), dtype=torch.bool) if ctrl_val is None else ctrl_val.bool()
    if src_val.shape != (len(src),) or ctrl_val.shape != (len(ctrl),):
        raise ValueError(
            f"src_val {tuple(src_val.shape)} / ctrl_val {tuple(ctrl_val.shape)} must "
            f"be ({len(src)},) / ({len(ctrl)},)"
        )
    if int((~src_val).sum()) < 2 or int((~ctrl_val).sum()) < 2:
        raise ValueError("fitting a token gate needs at least 2 training tokens per class")
    x = torch.cat([src, ctrl]).double()
    y = torch.cat([torch.ones(len(src)), torch.zeros(len(ctrl))]).double()
    val = torch.cat([src_val, ctrl_val])
    train = ~val
    n1, n0 = int((train & (y == 1)).sum()), int((train & (y == 0)).sum())
    weights = torch.where(y == 1, (n1 + n0) / (2.0 * n1), (n1 + n0) / (2.0 * n0)).double()
    w, c = _fit_folded(x, y, train, k, l2, weights)
    right = ((x @ w + c) > 0).double() == y

    def balanced(m):
        return 0.5 * (float(right[m & (y == 1)].double().mean()) + float(right[m & (y == 0)].double().mean()))

    train_acc = balanced(train)
    has_val = bool(src_val.any()) and bool(ctrl_val.any())
    return {
        "w": w,
        "c": c.reshape(1),
        "train_accuracy": train_acc,
        "val_accuracy": balanced(val) if has_val else train_acc,
    }


def gate_value(logit: torch.Tensor, kind: str) -> torch.Tensor:
    """The gate's opening from its logit w·z + c: σ(logit), or clamp(logit, 0, 1) for "relu"."""
    return torch.sigmoid(logit) if kind == "sigmoid" else logit.clamp(0.0, 1.0)


def calibrate_bias(logits: torch.Tensor, kind: str, opening: float, iters: int = 100) -> float:
    """The shift δ ≤ 0 of the gate's bias such that mean g(logits + δ) ≤ ``opening`` (as close
    to it as bisection gets, from below); 0 when the mean is already at most ``opening``.
    ``logits`` (n,): the gate's logits on control tokens."""
    logits = logits.double().flatten()
    mean = lambda delta: float(gate_value(logits + delta, kind).mean())
    if len(logits) == 0 or mean(0.0) <= opening:
        return 0.0
    lo, hi = -1.0, 0.0  # invariant: mean(lo) <= opening < mean(hi)
    while mean(lo) > opening:
        hi, lo = lo, 2 * lo
        if lo < -1e12:
            raise ValueError(f"control_opening={opening}: the gate cannot close that far")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean(mid) <= opening:
            lo = mid
        else:
            hi = mid
    return lo


def _val_sentences(n: int, val_fraction: float, g: torch.Generator) -> torch.Tensor:
    """(n,) bool: a seeded ``val_fraction`` of n sentences held out (none below 4 sentences)."""
    val = torch.zeros(n, dtype=torch.bool)
    if n >= 4 and val_fraction > 0:
        val[torch.randperm(n, generator=g)[: max(1, int(val_fraction * n))]] = True
    return val


def fit_gates(
    model,
    tokenizer,
    source: Sequence[str],
    control: Sequence[str],
    steering: Steering,
    k: int | None = None,
    l2: float = 1.0,
    threshold: float | None = None,
    on_low: str = "ungated",
    gate: str = "sigmoid",
    val_fraction: float = 0.25,
    max_length: int = 128,
    seed: int = 0,
    level: str = "sentence",
    max_tokens: int = 4096,
    control_opening: float | None = None,
    distributed: bool | None = None,
) -> Steering:
    """A copy of ``steering`` with a DSAS gate per module, fitted on the untouched model's
    activations at each module: ``source`` (label 1) against neutral ``control`` (label 0).
    ``model`` is a causal LM with its tokenizer, a diffusers pipeline (``tokenizer`` None; the
    gate is fitted on per-image means and applied per pixel) or a ``Target``.

    ``level="sentence"``: one sample per sentence (mean over its tokens). ``level="token"``
    (causal LM only): one sample per real token, at most ``max_tokens`` per class (a seeded
    subsample), class-balanced; validation on the tokens of held-out sentences and accuracies
    class-balanced. ``k`` principal components: default 5 for sentences (SPEC §5), 64 for
    tokens (on SmolLM2-135M the held-out token accuracy peaks there: 0.58 at k=5, 0.67 at 64,
    0.60 at 576). ``control_opening=q`` (0 < q ≤ 1, causal LM only) then lowers each gate's
    bias c until its mean opening over the control tokens (at most ``max_tokens``) is ≤ q.

    A module whose validation accuracy (of the logistic fit, before calibration) is below
    ``threshold`` (default 0.75 for sentences, 0.6 for tokens: a token's label is its
    sentence's, most tokens of an insult are ordinary words) gets no gate
    (``on_low="ungated"``: plain steering there) or loses its map
    (``on_low="disable"``). Per-module accuracies, status, the bias shift and the mean openings
    on the fitted tokens are kept in ``metadata["gates"]`` (saved with the file).

    Under torchrun (``distributed`` as for ``lf.train``) every rank fits the same gates:
    sentence-level activations are read in shares and gathered; token-level reads (a seeded
    subsample of tokens) are made whole on every rank.
    """
    ranks = setup_ranks(distributed)
    with agreed(ranks) as agreement:
        choice(on_low, "on_low", ("ungated", "disable"))
        choice(gate, "gate", ("sigmoid", "relu"))
        choice(level, "level", ("sentence", "token"))
        k = (5 if level == "sentence" else 64) if k is None else integer(k, "k", low=1)
        number(l2, "l2", low=0)
        threshold = (
            (0.75 if level == "sentence" else 0.6)
            if threshold is None
            else number(threshold, "threshold", low=0)
        )
        number(val_fraction, "val_fraction", low=0, high=0.9)
        integer(max_tokens, "max_tokens", low=2)
        if control_opening is not None:
            number(control_opening, "control_opening", low=0, low_open=True, high=1)
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a lineas_fast.Steering, got {type(steering).__name__}")
        steered = as_target(model, tokenizer, max_length=max_length)
        if level == "token" or control_opening is not None:
            language_model_target(
                steered, "fit_gates(level='token')" if level == "token" else "fit_gates(control_opening=...)"
            )
        steering = steered.resolve(steering)
        steering.validate(steered, strict=False)
        names = steering.modules
        source_enc, control_enc = steered.encode(source, "source"), steered.encode(control, "control")
        if len(source_enc) < 2 or len(control_enc) < 2:
            raise ValueError(
                f"fitting gates needs at least 2 source and 2 control sentences, got "
                f"{len(source_enc)} and {len(control_enc)}"
            )
        if ranks is not None:
            ranks.check_counts(
                ("source", len(source_enc), "source sentence"),
                ("control", len(control_enc), "control sentence"),
            )
        agreement.model = steered.root
        agreement.digest = settings_digest(
            names, list(source), list(control), [k, l2, threshold, on_low, gate, val_fraction, level, seed]
        )

    def read(encoded):
        return steered.pooled(encoded, names) if ranks is None else ranks.read(steered, encoded, names)

    g = torch.Generator().manual_seed(seed)
    src_tok = ctrl_tok = None
    with steered.frozen(), torch.no_grad():
        if level == "sentence":
            src, ctrl = read(source_enc), read(control_enc)
        if level == "token" or control_opening is not None:
            val_s = _val_sentences(len(source_enc), val_fraction, g)
            val_c = _val_sentences(len(control_enc), val_fraction, g)
            pos_s = token_positions([len(e) for e in source_enc], max_tokens, seed)
            pos_c = token_positions([len(e) for e in control_enc], max_tokens, seed + 1)
            if level == "token":
                src_tok = token_activations(steered, source_enc, names, pos_s)
            ctrl_tok = token_activations(steered, control_enc, names, pos_c)
    maps, gates, report = {}, {}, {}
    for n in names:
        if level == "sentence":
            fit = fit_gate(src[n].cpu(), ctrl[n].cpu(), k, l2, val_fraction, seed)
        else:
            fit = fit_token_gate(src_tok[n], ctrl_tok[n], val_s[pos_s[:, 0]], val_c[pos_c[:, 0]], k, l2)
        ok = fit["val_accuracy"] >= threshold
        status = "gated" if ok else on_low
        report[n] = {
            "train_accuracy": fit["train_accuracy"],
            "val_accuracy": fit["val_accuracy"],
            "status": status,
            "k": k,
            "level": level,
        }
        if status == "disable":
            continue
        maps[n] = steering[n]
        if not ok:
            continue
        w, c = fit["w"].double(), fit["c"].double().reshape(1)
        if gate == "relu":  # σ(x) ≈ clamp(x/4 + 1/2, 0, 1): same decision boundary
            w, c = w / 4, c / 4 + 0.5
        if ctrl_tok is not None:
            shift = (
                0.0
                if control_opening is None
                else calibrate_bias(ctrl_tok[n].double() @ w + c, gate, control_opening)
            )
            c = c + shift
            report[n]["bias_shift"] = shift
            report[n]["control_opening"] = float(gate_value(ctrl_tok[n].double() @ w + c, gate).mean())
            if src_tok is not None:
                report[n]["source_opening"] = float(gate_value(src_tok[n].double() @ w + c, gate).mean())
        dev = steering[n][0].device
        gates[n] = {"w": w.float().to(dev), "c": c.float().to(dev), "kind": gate}
    if not maps:
        raise ValueError(
            f"every gate's validation accuracy is below {threshold} and "
            f"on_low='disable' removed every map: {report}"
        )
    meta = {
        **steering.metadata,
        "gates": report,
        "gate_fit": {
            "k": k,
            "l2": l2,
            "threshold": threshold,
            "on_low": on_low,
            "n_source": len(source_enc),
            "n_control": len(control_enc),
            "level": level,
            "max_tokens": max_tokens,
            "control_opening": control_opening,
            "world_size": 1 if ranks is None else ranks.world_size,
        },
    }
    return Steering(maps, meta, gates)


@torch.no_grad()
def gate_openings(
    model,
    tokenizer,
    steering: Steering,
    texts: Sequence[str],
    strength=1.0,
    max_length: int = 128,
    use_gates: bool = True,
) -> dict[str, float]:
    """Mean per-token strength λ·g at each steered module over the real tokens of ``texts``
    (each truncated to ``max_length`` tokens, padding excluded) while ``steering`` is applied to
    the causal LM ``model`` at ``strength`` (a float or a per-module dict, as ``apply``): the
    gates read the activations they read in use, those of the steered model. At ``strength=1``
    this is the mean gate opening. An ungated module counts λ at every token, a module at
    strength 0 counts 0.

    Returns {module: mean} for every module of ``steering``, and under the key ``"mean"`` the
    mean over modules.
    """
    if not isinstance(steering, Steering):
        raise TypeError(f"steering must be a lineas_fast.Steering, got {type(steering).__name__}")
    lm = language_model_target(as_target(model, tokenizer, max_length=max_length), "gate_openings")
    enc = lm.encode(texts, "texts")
    own = lm.resolve(steering)
    if "mean" in own.modules:
        raise ValueError(
            "gate_openings reports the overall mean under 'mean': a steered module "
            "named 'mean' would collide with it"
        )
    sums = {n: torch.zeros((), dtype=torch.float64) for n in own.modules}
    count = 0
    with lm.frozen(), own.apply(lm, strength, use_gates=use_gates, record_strengths=True) as h:
        for _rows, ids, mask in padded_batches(enc, lm.pad_id, lm.device):
            with lm.autocast():
                lm.root(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            for n, recs in h.strengths.items():
                sums[n] += sum(r[real].double().sum().cpu() for r in recs)
                recs.clear()
            count += int(real.sum())
    out = {n: float(s) / count for n, s in sums.items()}
    out["mean"] = sum(out.values()) / len(out)
    return out
