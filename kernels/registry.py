"""Every Triton kernel of the library with each constexpr configuration its host wrapper can
launch, for the ahead-of-time compile lane (``python -m lineas_fast.kernels.compile_check``).

A configuration is (kernel, signature, constexprs, num_warps, serves_paper_shapes): the
signature maps each runtime argument to its Triton type, e.g. "*bf16" or "i32".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from . import affine_steer, gated_steer, rms_norm_shift, wasserstein, wasserstein_triton

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class KernelConfig:
    name: str
    kernel: object                       # a triton JITFunction
    signature: dict
    constexprs: dict
    num_warps: int
    paper_shapes: bool = True            # serves n <= 1024, d <= 8192: spills/over-limit fail
    tags: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in {**self.tags, **self.constexprs}.items()]
        return f"{self.name}[{','.join(parts)}]"


def _signature(kernel, types: dict) -> dict:
    """All of the kernel's arguments in order: given types, constexprs marked as such."""
    return {a: types.get(a, "constexpr") for a in kernel.arg_names}


def wasserstein_configs() -> list[KernelConfig]:
    out = []
    k = wasserstein_triton._wasserstein_fwd_kernel
    n_values = [1 << p for p in range(0, 12) if (1 << p) <= wasserstein.MAX_N]
    seen = set()
    for n in n_values:
        cfg = wasserstein.launch_config(n)
        key = (cfg["N_PAD"], cfg["BLOCK_D"], cfg["num_warps"])
        if key in seen:
            continue
        seen.add(key)
        for dt in DTYPES:
            types = {"x_ptr": f"*{dt}", "stride_xn": "i32", "stride_xd": "i32", "g_ptr": "*fp32",
                     "v_ptr": "*fp32", "w_ptr": "*fp32", "loss_ptr": "*fp32",
                     "grad_ptr": f"*{dt}", "n": "i32", "D": "i32"}
            out.append(KernelConfig("wasserstein_fwd", k, _signature(k, types),
                                    {"N_PAD": cfg["N_PAD"], "BLOCK_D": cfg["BLOCK_D"]},
                                    cfg["num_warps"], paper_shapes=cfg["N_PAD"] <= 1024,
                                    tags={"dtype": dt}))
    return out


def affine_configs() -> list[KernelConfig]:
    out = []
    fwd, bwd = affine_steer._affine_steer_fwd_kernel, affine_steer._affine_steer_bwd_kernel
    for dt, channel_first in itertools.product(DTYPES, (False, True)):
        cfg = affine_steer.launch_config(channel_first)
        blocks = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_D": cfg["BLOCK_D"]}
        common = {"u_ptr": "*fp32", "b_ptr": "*fp32", "lam_ptr": "*fp32", "lam_scalar": "fp32",
                  "P": "i32", "D": "i32", "S": "i32", "n_sblk": "i32"}
        for token in (False, True):
            types = {**common, "z_ptr": f"*{dt}", "y_ptr": f"*{dt}"}
            out.append(KernelConfig("affine_steer_fwd", fwd, _signature(fwd, types),
                                    {"CHANNEL_FIRST": channel_first, "TOKEN_STRENGTH": token,
                                     **blocks}, cfg["num_warps"], tags={"dtype": dt}))
        for token, dparam, dlam in itertools.product((False, True), repeat=3):
            if dlam and not token:
                continue            # a scalar strength has no per-token gradient
            types = {**common, "z_ptr": f"*{dt}", "g_ptr": f"*{dt}", "dz_ptr": f"*{dt}",
                     "du_part_ptr": "*fp32", "db_part_ptr": "*fp32", "dlam_ptr": "*fp32"}
            out.append(KernelConfig("affine_steer_bwd", bwd, _signature(bwd, types),
                                    {"CHANNEL_FIRST": channel_first, "TOKEN_STRENGTH": token,
                                     "NEED_DPARAM": dparam, "NEED_DSTRENGTH": dlam, **blocks},
                                    cfg["num_warps"], tags={"dtype": dt}))
    return out


def rms_norm_shift_configs() -> list[KernelConfig]:
    out = []
    k = rms_norm_shift._rms_norm_shift_fwd_kernel
    seen = set()
    for p in range(4, rms_norm_shift.MAX_D.bit_length()):   # d from 16 to MAX_D
        cfg = rms_norm_shift.launch_config(1 << p)
        if (cfg["BLOCK_D"], cfg["num_warps"]) in seen:
            continue
        seen.add((cfg["BLOCK_D"], cfg["num_warps"]))
        for dt, gemma in itertools.product(DTYPES, (False, True)):
            types = {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "c_ptr": "*fp32", "y_ptr": f"*{dt}",
                     "d": "i32", "eps": "fp32"}
            out.append(KernelConfig("rms_norm_shift_fwd", k, _signature(k, types),
                                    {"GEMMA": gemma, "BLOCK_D": cfg["BLOCK_D"]}, cfg["num_warps"],
                                    paper_shapes=cfg["BLOCK_D"] <= 8192, tags={"dtype": dt}))
    return out


def gated_configs() -> list[KernelConfig]:
    out = []
    fwd, bwd = gated_steer._gated_steer_fwd_kernel, gated_steer._gated_steer_bwd_kernel
    seen = set()
    for p in range(4, gated_steer.MAX_D.bit_length()):
        cfg = gated_steer.launch_config(1 << p)
        key = (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"])
        if key in seen:
            continue
        seen.add(key)
        blocks = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_D": cfg["BLOCK_D"]}
        for dt, relu in itertools.product(DTYPES, (False, True)):
            common = {"u_ptr": "*fp32", "b_ptr": "*fp32", "w_ptr": "*fp32", "c_ptr": "*fp32",
                      "lam": "fp32", "T": "i32", "D": "i32"}
            types = {**common, "z_ptr": f"*{dt}", "y_ptr": f"*{dt}", "s_ptr": "*fp32"}
            out.append(KernelConfig("gated_steer_fwd", fwd, _signature(fwd, types),
                                    {"RELU": relu, **blocks}, cfg["num_warps"], tags={"dtype": dt}))
            for dparam in (False, True):
                types = {**common, "z_ptr": f"*{dt}", "g_ptr": f"*{dt}", "dz_ptr": f"*{dt}",
                         "part_ptr": "*fp32"}
                out.append(KernelConfig("gated_steer_bwd", bwd, _signature(bwd, types),
                                        {"RELU": relu, "NEED_DPARAM": dparam, **blocks},
                                        cfg["num_warps"], tags={"dtype": dt}))
    return out


def all_configs() -> list[KernelConfig]:
    return (wasserstein_configs() + affine_configs() + rms_norm_shift_configs()
            + gated_configs())
