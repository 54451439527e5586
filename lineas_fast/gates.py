"""DSAS gates (SPEC §5): fitting g(z) = σ(w·z + c) per steered module.

The gate is fitted on mean-pooled activations at the module (what enters the map), source
sentences labelled 1 and neutral control sentences 0: PCA to k components, an L2 logistic
regression (Newton's method, float64), folded back into one vector w = Pᵀβ and one scalar c so
the gate costs one dot product per token.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .checks import choice, integer, number
from .steering import Steering
from .targets import as_target


def logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0,
                        iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularized logistic regression by Newton's method. x (n, k), y (n,) in {0, 1}.
    Returns (β (k,), β0 ()) float64; the intercept is not penalized."""
    x, y = x.double(), y.double()
    n, k = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta = torch.zeros(k + 1, dtype=torch.float64)
    reg = torch.full((k + 1,), float(l2), dtype=torch.float64)
    reg[-1] = 0.0
    for _ in range(iters):
        p = torch.sigmoid(xa @ theta)
        grad = xa.T @ (p - y) + reg * theta
        hess = xa.T @ (xa * (p * (1 - p))[:, None]) + torch.diag(reg) + 1e-9 * torch.eye(k + 1)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return theta[:k], theta[k]


def fit_gate(src: torch.Tensor, ctrl: torch.Tensor, k: int = 5, l2: float = 1.0,
             val_fraction: float = 0.25, seed: int = 0) -> dict:
    """Fit one gate on pooled activations src (n1, d) (label 1) and ctrl (n0, d) (label 0).

    Returns {"w": (d,) float32, "c": (1,) float32, "train_accuracy", "val_accuracy"}: the gate
    logit is w·z + c. With fewer than 4 samples per class there is no held-out split and the
    validation accuracy is the training accuracy.
    """
    if src.ndim != 2 or ctrl.ndim != 2 or src.shape[1] != ctrl.shape[1]:
        raise ValueError(f"source {tuple(src.shape)} and control {tuple(ctrl.shape)} activations "
                         f"must be (n, d) with the same d")
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
    mu = x[train].mean(0)
    k = max(1, min(k, int(train.sum()) - 1, x.shape[1]))
    _, _, vh = torch.linalg.svd(x[train] - mu, full_matrices=False)
    proj = vh[:k]                                           # (k, d)
    feats = (x - mu) @ proj.T
    scale = feats[train].std(0).clamp_min(1e-12)            # standardize for a well-posed L2
    beta, beta0 = logistic_regression(feats[train] / scale, y[train], l2)
    w = proj.T @ (beta / scale)                             # fold PCA, scaling and centering
    c = beta0 - w @ mu
    pred = ((x @ w + c) > 0).double()
    acc = lambda m: float((pred[m] == y[m]).double().mean()) if m.any() else float("nan")
    train_acc = acc(train)
    return {"w": w.float(), "c": c.reshape(1).float(), "train_accuracy": train_acc,
            "val_accuracy": acc(val) if val.any() else train_acc}


def fit_gates(model, tokenizer, source: Sequence[str], control: Sequence[str],
              steering: Steering, k: int = 5, l2: float = 1.0, threshold: float = 0.75,
              on_low: str = "ungated", gate: str = "sigmoid", val_fraction: float = 0.25,
              max_length: int = 128, seed: int = 0) -> Steering:
    """A copy of ``steering`` with a DSAS gate per module, fitted on the untouched model's pooled
    activations at each module: ``source`` (label 1) against neutral ``control`` (label 0).
    ``model`` is a causal LM with its tokenizer, a diffusers pipeline (``tokenizer`` None; the
    gate is fitted on per-image means and applied per pixel) or a ``Target``.

    A module whose validation accuracy is below ``threshold`` gets no gate (``on_low="ungated"``:
    plain steering there) or loses its map (``on_low="disable"``). Per-module accuracies and
    status are kept in ``metadata["gates"]`` (saved with the file).
    """
    choice(on_low, "on_low", ("ungated", "disable"))
    choice(gate, "gate", ("sigmoid", "relu"))
    integer(k, "k", low=1)
    number(l2, "l2", low=0)
    number(threshold, "threshold", low=0)
    number(val_fraction, "val_fraction", low=0, high=0.9)
    if not isinstance(steering, Steering):
        raise TypeError(f"steering must be a lineas_fast.Steering, got {type(steering).__name__}")
    steered = as_target(model, tokenizer, max_length=max_length)
    steering = steered.resolve(steering)
    steering.validate(steered, strict=False)
    names = steering.modules
    source_enc, control_enc = steered.encode(source, "source"), steered.encode(control, "control")
    with steered.frozen(), torch.no_grad():
        src = steered.pooled(source_enc, names)
        ctrl = steered.pooled(control_enc, names)
    maps, gates, report = {}, {}, {}
    for n in names:
        fit = fit_gate(src[n].cpu(), ctrl[n].cpu(), k, l2, val_fraction, seed)
        ok = fit["val_accuracy"] >= threshold
        status = "gated" if ok else on_low
        report[n] = {"train_accuracy": fit["train_accuracy"],
                     "val_accuracy": fit["val_accuracy"], "status": status, "k": k}
        if status == "disable":
            continue
        maps[n] = steering[n]
        if ok:
            dev = steering[n][0].device
            w, c = fit["w"].to(dev), fit["c"].to(dev)
            if gate == "relu":        # σ(x) ≈ clamp(x/4 + 1/2, 0, 1): same decision boundary
                w, c = w / 4, c / 4 + 0.5
            gates[n] = {"w": w, "c": c, "kind": gate}
    if not maps:
        raise ValueError(f"every gate's validation accuracy is below {threshold} and "
                         f"on_low='disable' removed every map: {report}")
    meta = {**steering.metadata, "gates": report,
            "gate_fit": {"k": k, "l2": l2, "threshold": threshold, "on_low": on_low,
                         "n_source": len(source), "n_control": len(control)}}
    return Steering(maps, meta, gates)
