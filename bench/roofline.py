"""Bytes moved and operations done per call by the loss and intervention kernels at the
paper's shapes, and the resulting lower bound on time for a device's bandwidth.

    python bench/roofline.py [--bandwidth-tbs 3.35]     # prints the table in bench/ROOFLINE.md

Counts follow the kernels' code: the loss kernel reads x, the profile (ḡ, v̄: float32) and the
column weights, and writes the per-column loss and the gradient (x's dtype); its backward reads
the gradient and writes the scaled one. The intervention forward reads z and writes y; its
backward reads z and g, writes ∂z and per-program float32 partials of ∂ω and ∂b (then summed).
"""
from __future__ import annotations

import argparse
import math

from lineas_fast.kernels import affine_steer, wasserstein

SIZES = {"fp32": 4, "bf16": 2}


def loss_counts(n, d, layers, dtype="fp32"):
    D, s = d * layers, SIZES[dtype]
    n_pad = wasserstein.launch_config(n)["N_PAD"]
    stages = int(math.log2(n_pad)) * (int(math.log2(n_pad)) + 1) // 2
    fwd_bytes = n * D * s + 2 * n * D * 4 + D * 4 + D * 4 + n * D * s
    bwd_bytes = 2 * n * D * s + D * 4
    sort_ops = stages * n_pad // 2 * D          # int64 compare-and-swap per pair per stage
    flops = 7 * n * D                           # diff, square, add, weight, grad (2), sum
    return {"fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "sort_cas": sort_ops, "flops": flops}


def steer_counts(tokens, d, dtype="bf16"):
    s = SIZES[dtype]
    programs = math.ceil(tokens / affine_steer.launch_config(False)["BLOCK_T"])
    fwd_bytes = 2 * tokens * d * s + 2 * d * 4
    partials = 2 * programs * d * 4
    bwd_bytes = 3 * tokens * d * s + 2 * d * 4 + 2 * partials
    return {"fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "fwd_flops": 3 * tokens * d,
            "bwd_flops": 7 * tokens * d}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="H100 SXM HBM3: 3.35")
    args = ap.parse_args(argv)
    bw = args.bandwidth_tbs * 1e12
    print("| op | shape | forward MB | backward MB | ops | bound fwd µs | bound bwd µs |")
    print("|---|---|---|---|---|---|---|")
    for layers in (28, 56):
        for d in (1536, 2304, 3584):
            c = loss_counts(32, d, layers)
            print(f"| loss fp32 | n=32, d={d}, L={layers} | {c['fwd_bytes'] / 1e6:.1f} | "
                  f"{c['bwd_bytes'] / 1e6:.1f} | {c['sort_cas'] / 1e6:.0f} M CAS + "
                  f"{c['flops'] / 1e6:.0f} MFLOP | {c['fwd_bytes'] / bw * 1e6:.1f} | "
                  f"{c['bwd_bytes'] / bw * 1e6:.1f} |")
    c = steer_counts(8192, 3584)
    print(f"| affine_steer bf16 | 8192 × 3584 | {c['fwd_bytes'] / 1e6:.1f} | "
          f"{c['bwd_bytes'] / 1e6:.1f} | {c['fwd_flops'] / 1e6:.0f} / {c['bwd_flops'] / 1e6:.0f} "
          f"MFLOP | {c['fwd_bytes'] / bw * 1e6:.1f} | {c['bwd_bytes'] / bw * 1e6:.1f} |")


if __name__ == "__main__":
    main()
