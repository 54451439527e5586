"""Triton is optional: where it is not installed (macOS, Windows, or a CPU-only install),
``import lineas_fast`` works and the PyTorch paths serve; ``backend="triton"`` says why it cannot
run. Checked in a fresh interpreter in which ``import triton`` fails."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

CHILD = textwrap.dedent(r'''
    import importlib.abc
    import sys

    class HideTriton(importlib.abc.MetaPathFinder):
        """``import triton`` fails as it does where Triton is not installed."""
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideTriton())
    import torch
    import lineas_fast as lf
    from lineas_fast.kernels._backend import triton_available

    inp = torch.load(sys.argv[1])
    out = {}
    z, om, b, g = (inp[k].clone().requires_grad_() for k in ("z", "om", "b", "w"))
    y = lf.affine_steer(z, om, b, 0.7)
    gz, gom, gb = torch.autograd.grad(y, (z, om, b), inp["gy"])
    out["affine"] = (y.detach(), gz, gom, gb)

    zc = inp["zc"].clone().requires_grad_()
    s = inp["sc"].clone().requires_grad_()
    y = lf.affine_steer(zc, om, b, s, inverse=True, channel_dim=1)
    out["affine_cf"] = (y.detach(),) + torch.autograd.grad(y, (zc, om, b, s), inp["gyc"])

    c = inp["c"].clone().requires_grad_()
    y, st = lf.gated_steer(z, om, b, g, c, 0.8, "sigmoid", return_strengths=True)
    out["gated"] = (y.detach(), st) + torch.autograd.grad(y, (z, om, b, g, c), inp["gy"])

    x = inp["x"].clone().requires_grad_()
    loss = lf.sliced_wasserstein(x, inp["y"])
    loss.backward()
    out["wasserstein"] = (loss.detach(), x.grad)

    errors = {}
    calls = {"affine_steer": lambda: lf.affine_steer(z, om, b, backend="triton"),
             "gated_steer": lambda: lf.gated_steer(z, om, b, g, c, backend="triton"),
             "sliced_wasserstein": lambda: lf.sliced_wasserstein(x, inp["y"], backend="triton")}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    out["triton_available"] = triton_available()
    out["triton_imported"] = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
    torch.save(out, sys.argv[2])
''')


def _run_without_triton(tmp_path, inputs):
    src, dst = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, src)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LINEAS_FAST_BACKEND")}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, f"without Triton the child failed:\n{res.stderr[-4000:]}"
    return torch.load(dst)


def _close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def test_import_and_pytorch_paths_without_triton(tmp_path):
    gen = torch.Generator().manual_seed(0)
    d, n = 8, 16
    inp = {
        "z": torch.randn(3, 5, d, generator=gen),
        "om": torch.rand(d, generator=gen) + 0.5,
        "b": torch.randn(d, generator=gen),
        "w": torch.randn(d, generator=gen) / d**0.5,
        "c": torch.tensor([0.3]),
        "gy": torch.randn(3, 5, d, generator=gen),
        "zc": torch.randn(2, d, 3, 4, generator=gen),
        "sc": torch.rand(2, 3, 4, generator=gen),
        "gyc": torch.randn(2, d, 3, 4, generator=gen),
        "x": torch.randn(n, 6, generator=gen),
        "y": torch.randn(n, 6, generator=gen) * 2 + 1,
    }
    out = _run_without_triton(tmp_path, inp)
    assert out["triton_available"] is False and out["triton_imported"] == []

    z, om, b, gy = (inp[k].double() for k in ("z", "om", "b", "gy"))
    # affine, λ = 0.7: y = z + λ((ω−1)z + b); ∂z = g(1 + λ(ω−1)), ∂ω = Σ λ g z, ∂b = Σ λ g
    y, gz, gom, gb = out["affine"]
    _close(y, z + 0.7 * ((om - 1) * z + b))
    _close(gz, gy * (1 + 0.7 * (om - 1)))
    _close(gom, (0.7 * gy * z).sum((0, 1)))
    _close(gb, (0.7 * gy).sum((0, 1)))

    # channel-first, per-pixel strength s, inverse map T⁻¹(z) = (z − b)/ω
    zc, s, g = inp["zc"].double(), inp["sc"].double()[:, None], inp["gyc"].double()
    omc, bc = om[None, :, None, None], b[None, :, None, None]
    y, gz, gom, gb, gs = out["affine_cf"]
    _close(y, zc + s * ((zc - bc) / omc - zc))
    _close(gz, g * (1 + s * (1 / omc - 1)))
    _close(gom, (g * s * -(zc - bc) / omc**2).sum((0, 2, 3)))
    _close(gb, (-g * s / omc).sum((0, 2, 3)))
    _close(gs, (g * ((zc - bc) / omc - zc)).sum(1))

    # gated, sigmoid gate, λ = 0.8: autograd through a float64 closed form
    leaves = [t.double().requires_grad_() for t in (inp["z"], inp["om"], inp["b"], inp["w"], inp["c"])]
    z64, om64, b64, w64, c64 = leaves
    lam = 0.8 * torch.sigmoid((z64 * w64).sum(-1) + c64)
    ref = z64 + lam[..., None] * ((om64 - 1) * z64 + b64)
    ref_grads = torch.autograd.grad(ref, leaves, gy)
    y, st, *grads = out["gated"]
    _close(y, ref.detach())
    _close(st, lam.detach())
    for a, r in zip(grads, ref_grads):
        _close(a, r, 1e-4)

    # Wasserstein, n = m: loss = mean_j Σ_i (sort x − sort y)²_ij, ∂x_kj = (2/d)(x_kj − ys[rank k, j])
    x, yt = inp["x"].double().numpy(), inp["y"].double().numpy()
    xs, ys = np.sort(x, 0), np.sort(yt, 0)
    ranks = np.argsort(np.argsort(x, 0), 0)
    loss, gx = out["wasserstein"]
    _close(loss, ((xs - ys) ** 2).sum(0).mean())
    _close(gx, 2 / x.shape[1] * (x - np.take_along_axis(ys, ranks, 0)))

    for name, err in out["errors"].items():
        assert (
            err is not None and err.startswith("RuntimeError") and "Triton" in err and "not installed" in err
        ), (name, err)


def test_backend_choice_without_triton(monkeypatch):
    """``use_triton``'s rule where Triton is missing: "auto" falls back even for CUDA tensors,
    "triton" says Triton is not installed; with Triton, "auto" picks it for CUDA tensors."""
    from lineas_fast.kernels import _backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LINEAS_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert _backend.use_triton(cuda) is True and _backend.use_triton(cpu) is False
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert _backend.use_triton(cuda) is False and _backend.use_triton(cuda, "auto") is False
    for device in (cuda, cpu):
        with pytest.raises(RuntimeError, match="Triton, which is not installed"):
            _backend.use_triton(device, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.use_triton(cpu) is False
    assert _backend.use_triton(cuda, "torch") is False
