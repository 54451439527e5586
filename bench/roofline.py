"""Static roofline of the loss and intervention kernels at the paper's shapes: bytes each call
must move (from the kernels' code), the compiled code's static costs (from the compile lane's
report, bench/results/kernel-resources.json), and the resulting lower bounds on A100 and H100.

    python bench/roofline.py [--report bench/results/kernel-resources.json]   # prints ROOFLINE.md's tables

Nothing here is measured: the HBM bound is bytes / peak bandwidth; the issue bound is the
SASS warp instructions one pass issues per element × elements / (SMs × 4 schedulers × boost
clock), from static instruction counts (one pass of a loop body), so it ignores stalls.
"""

from __future__ import annotations

import argparse
import json
import os

from lineas_fast.kernels import affine_steer, gated_steer, wasserstein

# name: (HBM bytes/s, SMs, boost clock Hz, arch of the compiled code)
DEVICES = {
    "A100 40GB": (1.555e12, 108, 1.41e9, 80),
    "A100 80GB": (2.039e12, 108, 1.41e9, 80),
    "H100 SXM": (3.35e12, 132, 1.98e9, 90),
}
SIZES = {"fp32": 4, "bf16": 2}
TOKENS, D = 8192, 3584  # intervention: 8192 tokens of Qwen2-7B's d
LOSS_N, LOSS_D, LOSS_L = 32, 3584, 28  # loss: n = 32 sentences, 28 layers of d = 3584


def _label(kernel, dtype, **cx):
    return f"{kernel}[dtype={dtype}," + ",".join(f"{k}={v}" for k, v in cx.items()) + "]"


def ops():
    """(op, shape, config label, elements, bytes) of each call at the paper's shapes."""
    out = []
    for dt, s in SIZES.items():
        cfg = wasserstein.launch_config(LOSS_N)
        n_el = LOSS_N * LOSS_D * LOSS_L
        out.append(
            (
                f"loss fwd+grad {dt}",
                f"n={LOSS_N}, d={LOSS_D}, L={LOSS_L}",
                _label(
                    "wasserstein_fwd",
                    dt,
                    N_PAD=cfg["N_PAD"],
                    BLOCK_D=cfg["BLOCK_D"],
                    UNIT_COLS=True,
                    NEED_GRAD=True,
                ),
                n_el,
                n_el * (s + 4 + 4),
            )
        )  # x, ḡ (fp32), gradient (fp32)
    s = SIZES["bf16"]
    n_el = TOKENS * D
    fwd = affine_steer.launch_config(TOKENS, D, 1)
    out.append(
        (
            "affine fwd bf16",
            f"{TOKENS} × {D}",
            _label(
                "affine_steer_fwd",
                "bf16",
                CHANNEL_FIRST=False,
                TOKEN_STRENGTH=False,
                BLOCK_T=fwd["BLOCK_T"],
                BLOCK_D=fwd["BLOCK_D"],
            ),
            n_el,
            n_el * 2 * s,
        )
    )
    bwd = affine_steer.backward_config(TOKENS, D, 1)
    partials = 2 * bwd["stripes"] * D * 4 * 2  # ∂u, ∂b: written, then summed
    out.append(
        (
            "affine bwd bf16 (∂z, ∂ω, ∂b)",
            f"{TOKENS} × {D}, {bwd['stripes']} stripes",
            _label(
                "affine_steer_bwd",
                "bf16",
                CHANNEL_FIRST=False,
                TOKEN_STRENGTH=False,
                NEED_DPARAM=True,
                NEED_DSTRENGTH=False,
                BLOCK_T=bwd["BLOCK_T"],
                BLOCK_D=bwd["BLOCK_D"],
            ),
            n_el,
            n_el * 3 * s + partials,
        )
    )
    P, C, S = 2, 320, 64 * 64
    cf = affine_steer.launch_config(P, C, S)
    out.append(
        (
            "affine fwd bf16, channel-first",
            f"({P}, {C}, 64, 64)",
            _label(
                "affine_steer_fwd",
                "bf16",
                CHANNEL_FIRST=True,
                TOKEN_STRENGTH=False,
                BLOCK_T=cf["BLOCK_T"],
                BLOCK_D=cf["BLOCK_D"],
            ),
            P * C * S,
            P * C * S * 2 * s,
        )
    )
    g = gated_steer.launch_config(D)
    out.append(
        (
            "gated fwd bf16",
            f"{TOKENS} × {D}",
            _label("gated_steer_fwd", "bf16", RELU=False, BLOCK_T=g["BLOCK_T"], BLOCK_D=g["BLOCK_D"]),
            n_el,
            n_el * 2 * s + TOKENS * 4,
        )
    )
    programs = gated_steer.backward_programs(TOKENS, g)
    out.append(
        (
            "gated bwd bf16 (∂z, ∂ω, ∂b, ∂w, ∂c)",
            f"{TOKENS} × {D}, {programs} programs",
            _label(
                "gated_steer_bwd",
                "bf16",
                RELU=False,
                NEED_DPARAM=True,
                BLOCK_T=g["BLOCK_T"],
                BLOCK_D=g["BLOCK_D"],
            ),
            n_el,
            n_el * 3 * s + programs * (3 * D + 1) * 4 * 2,
        )
    )
    return out


def table(report: dict) -> str:
    rows = {(r["config"], r["arch"]): r for r in report["kernels"]}
    lines = [
        "| op | shape | bytes/elem | warp-instr/elem sm_80 / sm_90 | barriers per pass "
        "| shared B/elem | " + " | ".join(f"{d} HBM / issue µs" for d in DEVICES) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(DEVICES),
    ]
    for op, shape, label, n_el, nbytes in ops():
        r80, r90 = rows.get((label, 80)), rows.get((label, 90))
        if r80 is None or r90 is None:
            lines.append(f"| {op} | {shape} | {nbytes / n_el:.2f} | not in report ({label}) |")
            continue
        bounds = []
        for _, (bw, sms, clock, arch) in DEVICES.items():
            r = r80 if arch == 80 else r90
            hbm = nbytes / bw * 1e6
            issue = n_el * r["warp_instructions_per_element"] / (sms * 4 * clock) * 1e6
            bounds.append(f"{hbm:.1f} / {issue:.1f}" + (" (issue-bound)" if issue > hbm else ""))
        bar = (
            f"{r90['loop_barriers']} in loop, {r90['barriers']} total"
            if r90["loops"]
            else f"{r90['barriers']}"
        )
        lines.append(
            f"| {op} | {shape} | {nbytes / n_el:.2f} | "
            f"{r80['warp_instructions_per_element']:.2f} / "
            f"{r90['warp_instructions_per_element']:.2f} | {bar} | "
            f"{r90['shared_bytes_per_element']:.2f} | " + " | ".join(bounds) + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--report", default=os.path.join(os.path.dirname(__file__), "results", "kernel-resources.json")
    )
    args = ap.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    print(
        f"Static estimates from `{os.path.basename(args.report)}` (triton {report['triton']}, "
        f"{report.get('date', '?')}); not measurements.\n"
    )
    print(table(report))


if __name__ == "__main__":
    main()
