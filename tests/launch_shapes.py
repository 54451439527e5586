"""Inputs that make the host wrappers launch each configuration of ``kernels/registry.py``.

The GPU lane (tests/gpu/test_every_configuration_*.py) runs each kernel at these shapes in every
dtype against the float64 checks of ``kernel_checks`` and records what was launched;
tests/cpu/test_launch_shapes.py checks, without a GPU, that the configurations the wrappers
would pick for them (their own ``launch_config`` functions, for an A100's 108 and an H100's 132
multiprocessors) cover the registry.

A configuration's key is (kernel function name, dtype tag, constexprs, num_warps), as
``registry_keys`` builds it from the registry and ``launch_key`` from a launch.
"""

from __future__ import annotations

import inspect
import itertools

import torch

from lineas_fast.kernels import affine_steer, gated_steer, registry, rms_norm_shift, wasserstein

DTYPES = {tag: getattr(torch, name) for tag, name in registry.DTYPES.items()}  # "bf16": bfloat16
DTYPE_TAGS = {name: tag for tag, name in registry.DTYPES.items()}  # "bfloat16": "bf16"


def key(kernel_name: str, dtype_tag: str, constexprs: dict, num_warps: int) -> tuple:
    return (kernel_name, dtype_tag, tuple(sorted(constexprs.items())), num_warps)


def registry_keys(kernel_name: str | None = None) -> set:
    """The registry's configurations (of one kernel function, e.g. "_gated_steer_fwd_kernel")."""
    return {
        key(c.kernel.__name__, c.tags["dtype"], c.constexprs, c.num_warps)
        for c in registry.all_configs()
        if kernel_name is None or c.kernel.__name__ == kernel_name
    }


def launch_key(fn, args: tuple, kwargs: dict) -> tuple:
    """The key of a launch ``fn[grid](*args, **kwargs)`` of a JITFunction: the dtype of its
    first tensor argument, the constexprs among its keyword arguments, num_warps."""
    if hasattr(fn, "params"):
        names = {p.name for p in fn.params if p.is_constexpr}
    else:  # TRITON_INTERPRET=1: an InterpretedFunction
        names = {
            n for n, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)
        }
    dtype = next(str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "dtype"))
    return key(
        fn.__name__,
        DTYPE_TAGS[dtype],
        {k: v for k, v in kwargs.items() if k in names},
        kwargs.get("num_warps", 4),
    )


# --- the loss: one launch config per padded source-set size ---------------------------------
def loss_cases() -> list[tuple[int, int, list[int]]]:
    """(n, m, dims) per distinct ``wasserstein.launch_config``: n odd-ish inside the padded size
    (masking exercised), m ≠ n (the exact n ≠ m profile); the widest layer, d = 8192, at the
    paper's n = 32."""
    out, seen = [], set()
    for p in range(0, wasserstein.MAX_N.bit_length()):
        n_pad = 1 << p
        cfg = wasserstein.launch_config(n_pad)
        if cfg["N_PAD"] in seen:
            continue
        seen.add(cfg["N_PAD"])
        n = max(2, cfg["N_PAD"] * 3 // 4 + 1)
        dims = [8192, 7] if cfg["N_PAD"] == 32 else [65, 3]
        out.append((n, n + 7, dims))
    return out


def loss_keys(n: int, dtype_tag: str, need_grad: bool = True, unit_cols: bool = True) -> set:
    cfg = wasserstein.launch_config(n)
    return {
        key(
            "_wasserstein_fwd_kernel",
            dtype_tag,
            {
                "N_PAD": cfg["N_PAD"],
                "BLOCK_D": cfg["BLOCK_D"],
                "UNIT_COLS": unit_cols,
                "NEED_GRAD": need_grad,
            },
            cfg["num_warps"],
        )
    }


# --- the affine map: the tile depends on the grid, so on the multiprocessors ----------------
CHANNEL_LAST_DIMS = (1023, 3584, 8192)
P_CANDIDATES = (1, 2, 3, 5, 8, 16, 31, 64, 127, 256, 511, 1024, 2048, 4096, 8192)
CHANNEL_FIRST_SHAPES = [(b, c, h, h) for b in (1, 2) for c in (4, 64, 320, 1280) for h in (2, 8, 16, 32)]


def _pd_s(shape, channel_first):
    if not channel_first:
        *tok, d = shape
        p = 1
        for t in tok:
            p *= t
        return p, d, 1
    return shape[0], shape[1], shape[2] * shape[3]


def affine_cases(sms: int) -> list[tuple[tuple, int]]:
    """(shape, channel_dim) giving each forward tile for a GPU of ``sms`` multiprocessors:
    channel-last (P, D) for D in CHANNEL_LAST_DIMS with the smallest P that picks each tile;
    channel-first (B, C, H, W) maps, the first shape that picks each tile."""
    out = []
    for d in CHANNEL_LAST_DIMS:
        picked = {}
        for p in P_CANDIDATES:
            cfg = affine_steer.launch_config(p, d, 1, sms)
            picked.setdefault((cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"]), p)
        out += [((p, d), -1) for p in picked.values()]
    picked = {}
    for shape in CHANNEL_FIRST_SHAPES:
        cfg = affine_steer.launch_config(*_pd_s(shape, True), sms)
        picked.setdefault((cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"]), shape)
    out += [(s, 1) for s in picked.values()]
    return out


def affine_keys(shape, channel_dim, dtype_tag, token, need_param, need_lam, sms) -> set:
    """The forward's and the backward's keys for ``check_affine`` at this case."""
    p, d, s = _pd_s(shape, channel_dim == 1)
    fwd = affine_steer.launch_config(p, d, s, sms)
    bwd = affine_steer.backward_config(p, d, s, sms)
    return {
        key(
            "_affine_steer_fwd_kernel",
            dtype_tag,
            {
                "CHANNEL_FIRST": fwd["CHANNEL_FIRST"],
                "TOKEN_STRENGTH": token,
                "BLOCK_T": fwd["BLOCK_T"],
                "BLOCK_D": fwd["BLOCK_D"],
            },
            fwd["num_warps"],
        ),
        key(
            "_affine_steer_bwd_kernel",
            dtype_tag,
            {
                "CHANNEL_FIRST": bwd["CHANNEL_FIRST"],
                "TOKEN_STRENGTH": token,
                "NEED_DPARAM": need_param,
                "NEED_DSTRENGTH": need_lam,
                "BLOCK_T": bwd["BLOCK_T"],
                "BLOCK_D": bwd["BLOCK_D"],
            },
            bwd["num_warps"],
        ),
    }


# backward flag combinations a launch can have: (token strength, ∂ω/∂b, ∂λ)
AFFINE_FLAGS = [(t, dp, dl) for t, dp, dl in itertools.product((False, True), repeat=3) if t or not dl]


# --- the gated map and the RMSNorm with shift: one config per row width -------------------
def gated_dims() -> list[int]:
    """One D per distinct ``gated_steer.launch_config``, up to MAX_D = 8192, not powers of 2
    except the widest."""
    out, seen = [], set()
    for p in range(4, gated_steer.MAX_D.bit_length()):
        cfg = gated_steer.launch_config(1 << p)
        k = (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"])
        if k not in seen:
            seen.add(k)
            out.append(cfg["BLOCK_D"] if cfg["BLOCK_D"] == gated_steer.MAX_D else cfg["BLOCK_D"] * 3 // 4 + 1)
    return out


def gated_keys(d: int, dtype_tag: str, relu: bool, need_param: bool) -> set:
    cfg = gated_steer.launch_config(d)
    blocks = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_D": cfg["BLOCK_D"]}
    return {
        key("_gated_steer_fwd_kernel", dtype_tag, {"RELU": relu, **blocks}, cfg["num_warps"]),
        key(
            "_gated_steer_bwd_kernel",
            dtype_tag,
            {"RELU": relu, "NEED_DPARAM": need_param, **blocks},
            cfg["num_warps"],
        ),
    }


def rms_dims() -> list[int]:
    """One d per distinct ``rms_norm_shift.launch_config``, up to its MAX_D."""
    out, seen = [], set()
    for p in range(4, rms_norm_shift.MAX_D.bit_length()):
        cfg = rms_norm_shift.launch_config(1 << p)
        if (cfg["BLOCK_D"], cfg["num_warps"]) not in seen:
            seen.add((cfg["BLOCK_D"], cfg["num_warps"]))
            out.append(max(16, cfg["BLOCK_D"] * 3 // 4 + 1))
    return out


def rms_keys(d: int, dtype_tag: str, gemma: bool) -> set:
    cfg = rms_norm_shift.launch_config(d)
    return {
        key(
            "_rms_norm_shift_fwd_kernel",
            dtype_tag,
            {"GEMMA": gemma, "BLOCK_D": cfg["BLOCK_D"]},
            cfg["num_warps"],
        )
    }
