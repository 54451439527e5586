"""Checks shared by the CPU lane (PyTorch path), the TRITON_INTERPRET=1 lane (Triton path) and
the GPU lane: every output and every gradient of each op against an independent float64
computation written here (never the library's own reference or its TargetProfile)."""

from __future__ import annotations

import numpy as np
import torch

import lineas_fast as lf


def ot_w2_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent exact 1-D W2² per column: merge both sets of quantile breakpoints, on each
    piece both quantile functions are constant."""
    n, m = x.shape[0], y.shape[0]
    xs, ys = np.sort(x, 0), np.sort(y, 0)
    cuts = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    mid, width = (cuts[:-1] + cuts[1:]) / 2, np.diff(cuts)
    ix = np.minimum((mid * n).astype(int), n - 1)
    iy = np.minimum((mid * m).astype(int), m - 1)
    return ((xs[ix] - ys[iy]) ** 2 * width[:, None]).sum(0)


def quantile_pieces(n: int, m: int):
    """The merged quantile breakpoints of n source and m target samples in exact integer units
    of 1/(n·m) (source cell i = [i·m, (i+1)·m), target cell k = [k·n, (k+1)·n)). Returns, per
    piece, (source rank, target rank, width as a fraction of [0, 1])."""
    cuts = np.union1d(np.arange(n + 1) * m, np.arange(m + 1) * n)
    lo, hi = cuts[:-1], cuts[1:]
    return lo // m, lo // n, (hi - lo) / (n * m)


def ot_w2_squared_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same exact W2² per column (d,) in float64 torch, differentiable in x by autograd
    (torch.sort, stable: ties take ranks in row order, as any consistent rule may)."""
    n, m = x.shape[0], y.shape[0]
    xs = torch.sort(x.double(), dim=0, stable=True).values
    ys = torch.sort(y.detach().double(), dim=0).values
    ix, iy, width = quantile_pieces(n, m)
    ix, iy = torch.as_tensor(ix, device=x.device), torch.as_tensor(iy, device=x.device)
    width = torch.as_tensor(width, dtype=torch.float64, device=x.device)
    return ((xs[ix] - ys[iy]) ** 2 * width[:, None]).sum(0)


def reduction_weight(n: int, d: int, n_layers: int, reduction: str) -> float:
    """What multiplies a layer's Σ_j W2²_j in the reduced loss (SPEC §2 "Reductions"):
    reference = mean over layers of the mean over coordinates of n·W2²_j; sum = Σ Σ W2²_j."""
    return n / (n_layers * d) if reduction == "reference" else 1.0


def expected_loss(xs, ys, reduction):
    per_layer = []
    for x, y in zip(xs, ys):
        w2 = ot_w2_squared(x.double().numpy(), y.double().numpy())
        per_layer.append(x.shape[0] * w2.mean() if reduction == "reference" else w2.sum())
    per_layer = np.array(per_layer)
    return (per_layer.mean() if reduction == "reference" else per_layer.sum()), per_layer


def expected_grad(x, y, reduction, n_layers):
    """∂loss/∂x of one layer in float64: autograd through the merged-breakpoint OT
    (``ot_w2_squared_torch``) times the reduction's weight. Independent of the library."""
    n, d = x.shape
    x64 = x.detach().cpu().double().requires_grad_()
    loss = reduction_weight(n, d, n_layers, reduction) * ot_w2_squared_torch(x64, y.cpu()).sum()
    (grad,) = torch.autograd.grad(loss, x64)
    return grad


def check_loss_and_grad(
    n, m, dims, reduction, backend, dtype=torch.float32, seed=0, ties=False, device="cpu"
):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=gen) for d in dims]
    ys = [torch.randn(m, d, generator=gen) * 1.5 + 0.3 for d in dims]
    if ties:
        xs = [torch.round(x * 2) / 2 for x in xs]
        ys = [torch.round(y * 2) / 2 for y in ys]
    xs = [x.to(device, dtype).requires_grad_() for x in xs]
    loss, per_layer = lf.sliced_wasserstein(
        xs, [y.to(device) for y in ys], reduction, return_per_layer=True, backend=backend
    )
    grads = [g.cpu() for g in torch.autograd.grad(loss, xs)]
    xs, loss, per_layer = [x.detach().cpu() for x in xs], loss.cpu(), per_layer.cpu()
    exact, exact_layers = expected_loss([x.detach().float() for x in xs], ys, reduction)
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # inputs rounded to dtype, math in fp32
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact) <= tol * max(1.0, abs(exact)), (loss.item(), exact)
    np.testing.assert_allclose(per_layer.numpy(), exact_layers, rtol=tol, atol=tol)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2  # gradient returned in the input dtype
    for x, y, g in zip(xs, ys, grads):
        assert g.dtype == dtype and g.shape == x.shape
        ref = expected_grad(x.float(), y, reduction, len(dims))
        err = (g.double() - ref).abs().max().item()
        assert err <= gtol * max(1e-3, ref.abs().max().item()), err


def check_low_precision_rule(dtype, backend, n=32, d=64, device="cpu"):
    """flash-attention's rule, per column and for the gradient: the error vs an independent
    float64 computation (numpy OT on the float32 input; the gradient by autograd through the
    float64 torch OT) is at most 2× PyTorch's own error computing the same in ``dtype`` (plus
    one rounding of the result to ``dtype`` for the gradient, which is returned in that dtype).
    Each column is its own layer (reduction "sum"), so the per-layer output is per column."""
    from lineas_fast.kernels.wasserstein_ref import wasserstein_columns_naive

    gen = torch.Generator().manual_seed(1)
    x32, y32 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    packed = lf.pack_profiles([lf.TargetProfile(y32[:, j : j + 1].to(device), n) for j in range(d)])
    w = torch.full((d,), 1.0 / n, device=device)
    # columns: W2²_j, in float64 from the float32 input
    exact = torch.from_numpy(ot_w2_squared(x32.double().numpy(), y32.double().numpy()))
    # The gradient is discontinuous where rounding creates ties, so its reference is taken at
    # the rounded input (same tie order: row order), not at the original.
    x_low = x32.to(dtype)
    x64 = x_low.double().requires_grad_()
    (exact_g,) = torch.autograd.grad(ot_w2_squared_torch(x64, y32).sum(), x64)
    x = x_low.to(device).requires_grad_()
    loss, ours = lf.sliced_wasserstein(
        [x[:, j : j + 1] for j in range(d)], packed, "sum", return_per_layer=True, backend=backend
    )
    (ours_g,) = torch.autograd.grad(loss, x)
    assert ours_g.dtype == dtype
    ours, ours_g = ours.cpu().double(), ours_g.cpu().double()
    xo = x_low.detach().requires_grad_()
    own = wasserstein_columns_naive(xo, y32, w.cpu())
    (own_g,) = torch.autograd.grad(own.sum(), xo)
    own, own_g = own.detach().double(), own_g.double()
    assert ours.shape == exact.shape and ours_g.shape == exact_g.shape
    assert (ours - exact).abs().max() <= 2 * (own - exact).abs().max()
    one_rounding = torch.finfo(dtype).eps * exact_g.abs().max()
    assert (ours_g - exact_g).abs().max() <= 2 * (own_g - exact_g).abs().max() + one_rounding


def check_loss_scale_grad(dtype, backend, n=32, d=64, scale=65536.0, device="cpu"):
    """The gradient of a 16-bit input under a loss scale (``(loss · scale).backward()``, as
    mixed-precision training does) against the float64 oracle times the scale. The unscaled
    gradient (~1e-8 here) is below float16's smallest subnormal: a gradient rounded to the
    input dtype before the scale is applied is 0 for a quarter of the entries. Returns the
    relative error (max |error| / max |oracle|)."""
    gen = torch.Generator().manual_seed(3)
    x_low = (torch.randn(n, d, generator=gen) * 1e-3).to(dtype)
    y = x_low.float() + torch.randn(n, d, generator=gen) * 2e-6
    x = x_low.to(device).requires_grad_()
    loss = lf.sliced_wasserstein(x, y.to(device), "reference", backend=backend)
    (loss * scale).backward()
    assert x.grad.dtype == dtype
    got = x.grad.cpu().double()
    ref = expected_grad(x_low.float(), y, "reference", 1) * scale
    assert ref.abs().min() > 0 and ref.abs().max() < torch.finfo(dtype).max
    if dtype == torch.float16:  # the scenario is a real underflow for a gradient rounded first
        assert ((ref / scale).to(dtype) == 0).sum() > n * d // 10
    assert not ((got == 0) & (ref != 0)).any(), int(((got == 0) & (ref != 0)).sum())
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    # one rounding of each entry to dtype, relative to the largest entry
    assert rel <= 2 * torch.finfo(dtype).eps, rel
    return rel


def layered_inputs(n, dtype, device="cpu", seed=4):
    """Four layers with different d and layouts, all views into larger tensors: contiguous;
    transposed (column stride n); a single column of a wide tensor; every other row of a
    taller one. Returns (leaves, xs, ys): gradients are taken with respect to the leaves."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    leaves = [mk(n, 5), mk(33, n), mk(n, 9), mk(2 * n, 17)]
    xs = [leaves[0], leaves[1].t(), leaves[2][:, 3:4], leaves[3][::2]]
    ys = [torch.randn(n, x.shape[1], generator=gen) * 1.5 + 0.3 for x in xs]
    return leaves, xs, ys


def check_layers_grad_rule(dtype, backend, reduction, n=24, device="cpu"):
    """Every layer's loss against the numpy OT and every layer's gradient against autograd
    through the float64 OT, for layers of different d and strides in one call: the gradient
    error is at most 2× that of PyTorch computing the same loss in ``dtype`` (sorting and
    differentiating in dtype) plus one rounding to dtype of the largest entry."""
    leaves, xs, ys = layered_inputs(n, dtype, device)
    loss, per_layer = lf.sliced_wasserstein(
        xs, [y.to(device) for y in ys], reduction, return_per_layer=True, backend=backend
    )
    grads = torch.autograd.grad(loss, leaves)
    exact, exact_layers = expected_loss([x.detach().cpu().float() for x in xs], ys, reduction)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert abs(loss.item() - exact) <= tol * max(1.0, abs(exact)), (loss.item(), exact)
    np.testing.assert_allclose(per_layer.cpu().numpy(), exact_layers, rtol=tol, atol=tol)
    L = len(xs)
    own_leaves = [leaf.detach().cpu().requires_grad_() for leaf in leaves]
    own_xs = [own_leaves[0], own_leaves[1].t(), own_leaves[2][:, 3:4], own_leaves[3][::2]]
    own_loss = sum(
        reduction_weight(n, x.shape[1], L, reduction)
        / n
        * ((x.sort(0).values - y.to(dtype).sort(0).values) ** 2).sum()
        for x, y in zip(own_xs, ys)
    )
    own_grads = torch.autograd.grad(own_loss, own_leaves)
    for i, (x, y, leaf, g, og) in enumerate(zip(xs, ys, leaves, grads, own_grads)):
        assert g.dtype == dtype and g.shape == leaf.shape, i
        ref = torch.zeros(leaf.shape, dtype=torch.float64)
        view = [ref, ref.t(), ref[:, 3:4], ref[::2]][i]
        view.copy_(expected_grad(x.float(), y, reduction, L))
        err = (g.cpu().double() - ref).abs().max().item()
        own = (og.double() - ref).abs().max().item()
        one_rounding = torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * own + one_rounding, (i, err, own)


def rms_norm_shift_exact(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, eps: float, gemma: bool
) -> torch.Tensor:
    """RMSNorm with a shift in float64, written from its definition: x̂ = x / sqrt(mean(x²) + eps);
    Llama: y = w ⊙ cast(x̂ to x's dtype) + c (the cast is the module's semantics, as in
    transformers); Gemma: y = (1 + w) ⊙ x̂ + c. Returns float64 (no final rounding)."""
    x64 = x.detach().cpu().double()
    w64, c64 = weight.detach().cpu().double(), shift.detach().cpu().double()
    xhat = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x64.shape[-1] + eps)
    if gemma:
        return (1.0 + w64) * xhat + c64
    return w64 * xhat.to(x.dtype).double() + c64


def check_rms_norm_shift(shape, gemma, dtype, device="cpu", seed=0, interpreted=False):
    """The fused RMSNorm-with-shift kernel against ``rms_norm_shift_exact``, by flash-attention's
    rule: its error is at most 2× that of the PyTorch reference computing in ``dtype``, plus
    two float32 roundings of the result (where PyTorch happens to be exact); and within a few
    roundings in ``dtype`` of the exact value."""
    from lineas_fast.kernels.rms_norm_shift import rms_norm_shift_triton
    from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref

    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    w, c = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    got = rms_norm_shift_triton(x.to(device), w.to(device), c.to(device), 1e-6, gemma)
    own = rms_norm_shift_ref(x, w, c, 1e-6, gemma)  # PyTorch computing in dtype
    exact = rms_norm_shift_exact(x, w, c, 1e-6, gemma)
    assert got.dtype == dtype and got.shape == x.shape
    got = got.cpu().double()
    # Triton's interpreter truncates float32 -> bfloat16 where the compiled kernel rounds to
    # nearest (cvt.rn.bf16.f32 in its PTX): allow that one extra ulp there.
    ulp = torch.finfo(dtype).eps * exact.abs() if (interpreted and dtype != torch.float32) else 0
    slack = 2 * torch.finfo(torch.float32).eps * exact.abs().max()
    assert ((got - exact).abs() - ulp).max() <= 2 * (own.double() - exact).abs().max() + slack
    # The rule cannot see an error the kernel shares with its PyTorch reference; against the
    # independent formula the error is also at most a few roundings of the largest output
    # (measured: at most 1.2 eps · max|y| for d ≤ 1023).
    assert (got - exact).abs().max() <= 4 * torch.finfo(dtype).eps * exact.abs().max()


def closed_form_steer(z, omega, bias, lam, inverse, channel_dim):
    """a⊙z + c in float64 (SPEC §3), lam shaped like z with size 1 at channel_dim."""
    shape = [1] * z.ndim
    shape[channel_dim] = -1
    om, b = omega.double().view(shape), bias.double().view(shape)
    t = (z.double() - b) / om if inverse else om * z.double() + b
    return z.double() + lam * (t - z.double())


def check_affine(
    shape,
    channel_dim,
    strength_kind,
    inverse,
    backend,
    dtype=torch.float32,
    seed=0,
    device="cpu",
    need_param=True,
    need_strength=True,
):
    """The map's output and the gradients of z and of whichever of ω, b (``need_param``) and a
    tensor strength (``need_strength``) require grad, against the float64 closed form."""
    gen = torch.Generator().manual_seed(seed)
    cd = channel_dim % len(shape)
    d = shape[cd]
    z = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    omega = (torch.rand(d, generator=gen) + 0.5).to(device).requires_grad_(need_param)
    bias = torch.randn(d, generator=gen).to(device).requires_grad_(need_param)
    tok_shape = [s for i, s in enumerate(shape) if i != cd]
    if strength_kind == "float":
        strength, lam = 0.7, torch.tensor(0.7, dtype=torch.float64)
    else:
        strength = torch.rand(*tok_shape, generator=gen).to(device).requires_grad_(need_strength)
        lam = strength.detach().cpu().double().unsqueeze(cd)
    y = lf.affine_steer(z, omega, bias, strength, inverse=inverse, channel_dim=channel_dim, backend=backend)
    assert y.shape == z.shape and y.dtype == dtype
    ref = closed_form_steer(z.detach().cpu(), omega.detach().cpu(), bias.detach().cpu(), lam, inverse, cd)
    otol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y.detach().cpu().double() - ref).abs().max().item() <= otol * max(1.0, ref.abs().max().item())
    # every gradient against autograd through the float64 closed form
    g = torch.randn(*shape, generator=gen)
    inputs = [z, omega, bias] + ([strength] if strength_kind == "tensor" else [])
    wanted = [t.requires_grad for t in inputs]
    grads = [
        t.cpu() for t in torch.autograd.grad(y, [t for t in inputs if t.requires_grad], g.to(device, dtype))
    ]
    z64 = z.detach().cpu().double().requires_grad_()
    om64 = omega.detach().cpu().double().requires_grad_()
    b64 = bias.detach().cpu().double().requires_grad_()
    extra = []
    if strength_kind == "tensor":
        s64 = strength.detach().cpu().double().requires_grad_()
        lam64, extra = s64.unsqueeze(cd), [s64]
    else:
        lam64 = lam
    ref64 = closed_form_steer(z64, om64, b64, lam64, inverse, cd)
    ref_grads = torch.autograd.grad(ref64, [z64, om64, b64] + extra, g.to(dtype).double())
    names = [n for n, w in zip(["z", "omega", "bias", "strength"], wanted) if w]
    ref_grads = [r for r, w in zip(ref_grads, wanted) if w]
    gtol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(names, grads, ref_grads):
        assert a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= gtol * scale, name


def check_gated(shape, gate, inverse, backend, dtype=torch.float32, seed=0, device="cpu", need_param=True):
    """Gated steering against autograd through a float64 closed form: y and the per-token
    strength, and the gradients of z and (``need_param``) of ω, b, w and c."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    mk = lambda t: t.to(device).requires_grad_(need_param)
    z = (torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()
    om = mk(torch.rand(d, generator=gen) + 0.5)
    b = mk(torch.randn(d, generator=gen))
    w = mk(torch.randn(d, generator=gen) / d**0.5)
    c = mk(torch.tensor([0.2]))
    y, s = lf.gated_steer(z, om, b, w, c, 0.8, gate, inverse, return_strengths=True, backend=backend)
    g = torch.randn(*shape, generator=gen).to(device, dtype)
    inputs = [z, om, b, w, c] if need_param else [z]
    grads = [t.cpu().double() for t in torch.autograd.grad(y, inputs, g)]
    leaves = [t.detach().cpu().double().requires_grad_() for t in (z, om, b, w, c)]
    z64, om64, b64, w64, c64 = leaves
    logit = z64 @ w64 + c64
    lam = 0.8 * (torch.sigmoid(logit) if gate == "sigmoid" else logit.clamp(0.0, 1.0))
    t = (z64 - b64) / om64 if inverse else om64 * z64 + b64
    ref = z64 + lam.unsqueeze(-1) * (t - z64)
    ref_grads = torch.autograd.grad(ref, leaves, g.cpu().double())
    otol, gtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    scale = max(1.0, ref.abs().max().item())
    assert (y.detach().cpu().double() - ref).abs().max().item() <= otol * scale
    assert (s.cpu().double() - lam.detach()).abs().max().item() <= otol
    for name, a, r in zip(["z", "omega", "bias", "gate_w", "gate_c"], grads, ref_grads):
        assert (a - r).abs().max().item() <= gtol * max(1.0, r.abs().max().item()), name


def pooled_unpadded(model, tokenizer, texts, names, maps=None):
    """Per-sentence mean of each named module's output over the sentence's tokens, float64
    (len(texts), d): every sentence run alone (no padding, no batching), in eval mode, with
    ``maps`` {name: (omega, bias)} applied to those modules' outputs by plain forward hooks
    (ω⊙z + b, SPEC §3 at strength 1). Independent of the library's capture, pooling and hooks."""
    named = dict(model.named_modules())
    rows = {n: [] for n in names}
    seen = {}

    def hook_for(n):
        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            if maps and n in maps:
                om, b = maps[n]
                h = h * om.to(h.dtype) + b.to(h.dtype)
                out = (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            seen[n] = h[0].double().mean(0)
            return out

        return hook

    hooks = [
        named[n].register_forward_hook(hook_for(n)) for n in dict.fromkeys(list(names) + list(maps or {}))
    ]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer([text], return_tensors="pt")["input_ids"]
                seen.clear()
                model(input_ids=ids)
                for n in names:
                    rows[n].append(seen.pop(n))
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes:
            mod.training = mode
    return {n: torch.stack(r) for n, r in rows.items()}


def profile_mean(y: np.ndarray, n: int) -> np.ndarray:
    """ḡ (n, d): the mean of y's quantile function over each of n source cells (SPEC §2),
    accumulated piece by piece over the merged breakpoints."""
    m = y.shape[0]
    ys = np.sort(y, 0)
    g = np.zeros((n, y.shape[1]))
    for i, k, width in zip(*quantile_pieces(n, m)):
        g[i] += n * width * ys[k]
    return g
