"""Every Triton kernel of the library with each constexpr configuration its host wrapper can
launch, for the ahead-of-time compile lane (``python -m lineas_fast.kernels.compile_check``),
and the budgets the compiled code must meet at the paper's shapes (``BUDGETS``).

A configuration is (kernel, signature, constexprs, num_warps, serves_paper_shapes, values,
elements): the signature maps each runtime argument to its Triton type, e.g. "*bf16" or "i32";
``values`` gives the integer arguments a launch at a paper shape passes (the JIT specialises on
them: divisible by 16, or equal to 1); ``elements`` is how many elements one pass of the
kernel's code handles (its tile), for the per-element counts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from . import affine_steer, gated_steer, rms_norm_shift, wasserstein

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class KernelConfig:
    name: str
    kernel: object  # a triton JITFunction
    signature: dict
    constexprs: dict
    num_warps: int
    paper_shapes: bool = True  # serves n <= 1024, d <= 8192: spills/over-limit fail
    tags: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # int/float args of a paper-shape launch
    elements: int = 0  # elements per pass of the code; 0: the BLOCK_*/N_PAD product

    @property
    def tile_elements(self) -> int:
        if self.elements:
            return self.elements
        n = 1
        for k, v in self.constexprs.items():
            if (k.startswith("BLOCK") or k == "N_PAD") and isinstance(v, int) and not isinstance(v, bool):
                n *= v
        return n

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in {**self.tags, **self.constexprs}.items()]
        return f"{self.name}[{','.join(parts)}]"


def _signature(kernel, types: dict) -> dict:
    """All of the kernel's arguments in order: given types, constexprs marked as such."""
    return {a: types.get(a, "constexpr") for a in kernel.arg_names}


# The loss at the demo's shape: 30 layers of d = 576 (SmolLM2-135M), D = 17280.
LOSS_LAYERS, LOSS_D = 30, 576


def wasserstein_configs() -> list[KernelConfig]:
    """Every launch configuration of the loss kernel (one per N_PAD; see
    ``wasserstein.launch_config``) in each dtype, with the gradient and unit column strides
    (what training launches); at n = 32 also without the gradient (no_grad) and with strided
    columns. ``values`` are the ints of a launch with n = N_PAD over 30 layers of d = 576:
    n and D = 17280 are multiples of 16 (the JIT marks them divisible), NB = cdiv(576,
    BLOCK_D) is 9, 18, 36, ... (divisible by 16 from BLOCK_D ≤ 4 on)."""
    out = []
    k = wasserstein._wasserstein_fwd_kernel
    n_values = [1 << p for p in range(0, 12) if (1 << p) <= wasserstein.MAX_N]
    seen = set()
    for n in n_values:
        cfg = wasserstein.launch_config(n)
        key = (cfg["N_PAD"], cfg["BLOCK_D"], cfg["num_warps"])
        if key in seen:
            continue
        seen.add(key)
        variants = [(True, True)] + ([(False, True), (True, False)] if cfg["N_PAD"] == 32 else [])
        for dt, (need_grad, unit) in itertools.product(DTYPES, variants):
            types = {
                "x_ptr": f"*{dt}",
                "tab_ptr": "*i64",
                "g_ptr": "*fp32",
                "w_ptr": "*fp32",
                "part_ptr": "*fp32",
                "grad_ptr": "*fp32",
                "gscale": "fp32",
                "n": "i32",
                "D": "i32",
                "NB": "i32",
            }
            values = {
                "n": cfg["N_PAD"],
                "D": LOSS_LAYERS * LOSS_D,
                "NB": -(-LOSS_D // cfg["BLOCK_D"]),
                "gscale": 2.0 / LOSS_LAYERS,
            }
            out.append(
                KernelConfig(
                    "wasserstein_fwd",
                    k,
                    _signature(k, types),
                    {
                        "N_PAD": cfg["N_PAD"],
                        "BLOCK_D": cfg["BLOCK_D"],
                        "UNIT_COLS": unit,
                        "NEED_GRAD": need_grad,
                    },
                    cfg["num_warps"],
                    paper_shapes=cfg["N_PAD"] <= 1024,
                    tags={"dtype": dt},
                    values=values,
                )
            )
    return out


# Integer arguments of launches at the paper's shapes: 8192 tokens of d = 3584 (Qwen2-7B), and
# SD UNet maps (2, 1280, 32, 32). Every size is a multiple of 16, so the JIT marks them
# divisible by 16; channel-last launches pass S = n_sblk = 1, which the JIT makes constants.
PAPER_TOKENS, PAPER_D = 8192, 3584
PAPER_MAP = (2, 1280, 32 * 32)


def affine_configs() -> list[KernelConfig]:
    out = []
    fwd, bwd = affine_steer._affine_steer_fwd_kernel, affine_steer._affine_steer_bwd_kernel
    fwd_tiles = [(False, t) for t in affine_steer.CHANNEL_LAST_TILES] + [
        (True, t) for t in affine_steer.CHANNEL_FIRST_TILES
    ]
    bwd_tiles = [(False, affine_steer.CHANNEL_LAST_BWD_TILE)] + [
        (True, t) for t in affine_steer.CHANNEL_FIRST_TILES
    ]
    common = {
        "u_ptr": "*fp32",
        "b_ptr": "*fp32",
        "lam_ptr": "*fp32",
        "lam_scalar": "fp32",
        "P": "i32",
        "D": "i32",
        "S": "i32",
        "n_sblk": "i32",
    }

    def values(channel_first, bt):
        P, D, S = PAPER_MAP if channel_first else (PAPER_TOKENS, PAPER_D, 1)
        n_sblk = -(-S // bt)
        return {
            "P": P,
            "D": D,
            "S": S,
            "n_sblk": n_sblk,
            "n_tiles": P * n_sblk if channel_first else -(-P // bt),
        }

    for dt, (channel_first, (bt, bd, warps)) in itertools.product(DTYPES, fwd_tiles):
        for token in (False, True):
            types = {**common, "z_ptr": f"*{dt}", "y_ptr": f"*{dt}"}
            out.append(
                KernelConfig(
                    "affine_steer_fwd",
                    fwd,
                    _signature(fwd, types),
                    {"CHANNEL_FIRST": channel_first, "TOKEN_STRENGTH": token, "BLOCK_T": bt, "BLOCK_D": bd},
                    warps,
                    tags={"dtype": dt},
                    values=values(channel_first, bt),
                )
            )
    for dt, (channel_first, (bt, bd, warps)) in itertools.product(DTYPES, bwd_tiles):
        for token, dparam, dlam in itertools.product((False, True), repeat=3):
            if dlam and not token:
                continue  # a scalar strength has no per-token gradient
            types = {
                **common,
                "z_ptr": f"*{dt}",
                "g_ptr": f"*{dt}",
                "dz_ptr": f"*{dt}",
                "du_part_ptr": "*fp32",
                "db_part_ptr": "*fp32",
                "dlam_part_ptr": "*fp32",
                "n_tiles": "i32",
            }
            out.append(
                KernelConfig(
                    "affine_steer_bwd",
                    bwd,
                    _signature(bwd, types),
                    {
                        "CHANNEL_FIRST": channel_first,
                        "TOKEN_STRENGTH": token,
                        "NEED_DPARAM": dparam,
                        "NEED_DSTRENGTH": dlam,
                        "BLOCK_T": bt,
                        "BLOCK_D": bd,
                    },
                    warps,
                    tags={"dtype": dt},
                    values=values(channel_first, bt),
                )
            )
    return out


def rms_norm_shift_configs() -> list[KernelConfig]:
    out = []
    k = rms_norm_shift._rms_norm_shift_fwd_kernel
    seen = set()
    for p in range(4, rms_norm_shift.MAX_D.bit_length()):  # d from 16 to MAX_D
        cfg = rms_norm_shift.launch_config(1 << p)
        if (cfg["BLOCK_D"], cfg["num_warps"]) in seen:
            continue
        seen.add((cfg["BLOCK_D"], cfg["num_warps"]))
        for dt, gemma in itertools.product(DTYPES, (False, True)):
            types = {
                "x_ptr": f"*{dt}",
                "w_ptr": "*fp32",
                "c_ptr": "*fp32",
                "y_ptr": f"*{dt}",
                "d": "i32",
                "eps": "fp32",
            }
            out.append(
                KernelConfig(
                    "rms_norm_shift_fwd",
                    k,
                    _signature(k, types),
                    {"GEMMA": gemma, "BLOCK_D": cfg["BLOCK_D"]},
                    cfg["num_warps"],
                    paper_shapes=cfg["BLOCK_D"] <= 8192,
                    tags={"dtype": dt},
                    values={"d": max(16, 3 * cfg["BLOCK_D"] // 4)},
                )
            )
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
        values = {
            "T": PAPER_TOKENS,
            "D": 7 * cfg["BLOCK_D"] // 8,  # 3584 for BLOCK_D 4096
            "n_tiles": PAPER_TOKENS // cfg["BLOCK_T"],
        }
        for dt, relu in itertools.product(DTYPES, (False, True)):
            common = {
                "u_ptr": "*fp32",
                "b_ptr": "*fp32",
                "w_ptr": "*fp32",
                "c_ptr": "*fp32",
                "lam": "fp32",
                "T": "i32",
                "D": "i32",
            }
            types = {**common, "z_ptr": f"*{dt}", "y_ptr": f"*{dt}", "s_ptr": "*fp32"}
            out.append(
                KernelConfig(
                    "gated_steer_fwd",
                    fwd,
                    _signature(fwd, types),
                    {"RELU": relu, **blocks},
                    cfg["num_warps"],
                    tags={"dtype": dt},
                    values=values,
                )
            )
            for dparam in (False, True):
                types = {
                    **common,
                    "z_ptr": f"*{dt}",
                    "g_ptr": f"*{dt}",
                    "dz_ptr": f"*{dt}",
                    "part_ptr": "*fp32",
                    "n_tiles": "i32",
                }
                out.append(
                    KernelConfig(
                        "gated_steer_bwd",
                        bwd,
                        _signature(bwd, types),
                        {"RELU": relu, "NEED_DPARAM": dparam, **blocks},
                        cfg["num_warps"],
                        tags={"dtype": dt},
                        values=values,
                    )
                )
    return out


def all_configs() -> list[KernelConfig]:
    return wasserstein_configs() + affine_configs() + rms_norm_shift_configs() + gated_configs()


@dataclass
class Budget:
    """The most a kernel's compiled code may spend at the paper's shapes (static SASS counts of
    one program, see compile_check). None: not limited."""

    name: str
    kernel: str
    applies: object  # KernelConfig -> bool
    why: str
    max_barriers: int | None = None
    max_loop_barriers: int | None = None
    max_shuffles: int | None = None
    max_shared_bytes_per_element: float | None = None
    max_warp_instructions_per_element: float | None = None
    max_warps: int | None = None

    LIMITS = (
        ("barriers", "max_barriers"),
        ("loop_barriers", "max_loop_barriers"),
        ("shuffles", "max_shuffles"),
        ("shared_bytes_per_element", "max_shared_bytes_per_element"),
        ("warp_instructions_per_element", "max_warp_instructions_per_element"),
        ("num_warps", "max_warps"),
    )

    def violations(self, row: dict) -> list[str]:
        out = []
        for key, limit in self.LIMITS:
            cap = getattr(self, limit)
            if cap is not None and row[key] > cap:
                out.append(f"budget {self.name!r}: {key} {row[key]} > {cap}")
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kernel": self.kernel,
            "why": self.why,
            **{limit: getattr(self, limit) for _, limit in self.LIMITS if getattr(self, limit) is not None},
        }


def budget_for(cfg: KernelConfig) -> Budget | None:
    """The first budget of ``BUDGETS`` that applies to ``cfg`` (paper-shape configurations only)."""
    if not cfg.paper_shapes:
        return None
    return next((b for b in BUDGETS if b.kernel == cfg.name and b.applies(cfg)), None)


# What the restructured kernels need at the paper's shapes, from the static SASS of the
# specialised builds (bench/results/kernel-resources.json); a configuration above its budget
# fails the compile lane. The first budget whose kernel and condition match applies. "Warp
# instructions per element" is what one pass of the code issues per element it handles: an
# H100 SXM issues ~1000 G warp-instructions/s (132 SMs × 4 × 1.98 GHz) and its HBM moves
# 3.35 TB/s, so a bf16 map (4-6 bytes per element) stays memory-bound below ~1.2-1.8.
BUDGETS: list[Budget] = [
    Budget(
        "loss-one-warp",
        "wasserstein_fwd",
        lambda c: c.constexprs.get("N_PAD", 0) <= 64,
        "n ≤ 64: each column's sort lives in one warp (shuffles, no shared memory), a few "
        "barriers for the per-program epilogue at most",
        max_barriers=4,
        max_warps=1,
    ),
    Budget(
        "loss-one-warp-wide",
        "wasserstein_fwd",
        lambda c: c.constexprs.get("N_PAD", 0) <= 1024,
        "64 < n ≤ 1024: still one warp per program (the sort across its lanes by shuffles), "
        "so still no more than a few barriers",
        max_barriers=4,
        max_warps=1,
    ),
    Budget(
        "affine-fwd",
        "affine_steer_fwd",
        lambda c: True,
        "pure map: z read once, y written once, no reduction, nothing through shared memory",
        max_barriers=0,
        max_shuffles=0,
        max_shared_bytes_per_element=0,
        max_warp_instructions_per_element=0.8,
    ),
    Budget(
        "affine-bwd-dlam-channel-first",
        "affine_steer_bwd",
        lambda c: c.constexprs["CHANNEL_FIRST"] and c.constexprs["NEED_DSTRENGTH"],
        "a per-position strength's gradient sums over channels spread across warps: one "
        "cross-warp reduction per tile",
        max_loop_barriers=10,
        max_barriers=16,
        max_warp_instructions_per_element=1.25,
    ),
    Budget(
        "affine-bwd",
        "affine_steer_bwd",
        lambda c: True,
        "∂z per tile with no barrier; ∂u, ∂b accumulated in registers over the stripe and "
        "reduced once at the end (channel-last: inside one warp; channel-first: ≤ 3 barriers)",
        max_loop_barriers=0,
        max_barriers=3,
        max_warp_instructions_per_element=0.8,
    ),
    Budget(
        "gated-fwd",
        "gated_steer_fwd",
        lambda c: True,
        "one row reduction for the gate (across warps for wide rows), no other exchange; "
        "triton 3.9 builds it with at most 3 barriers, triton 3.6 (the lent GPU machines') "
        "with 4 at BLOCK_D 256-1024",
        max_barriers=4,
        max_warp_instructions_per_element=0.8,
    ),
    Budget(
        "gated-bwd",
        "gated_steer_bwd",
        lambda c: True,
        "one two-operand row reduction (logit, r) per tile; the parameter partials reduced "
        "once per program at the end",
        max_loop_barriers=3,
        max_barriers=64,
        max_warp_instructions_per_element=1.1,
    ),
    Budget(
        "rms-norm-shift",
        "rms_norm_shift_fwd",
        lambda c: True,
        "one row reduction (Σx²), nothing else through shared memory",
        max_barriers=3,
    ),
]
