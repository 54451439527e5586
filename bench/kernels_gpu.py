"""GPU kernel benchmark: writes bench/results/kernels-<device>.json.

    python bench/kernels_gpu.py [--compile-at 56x3584] [--out PATH] [--check-args]

Forward, backward and full (fwd+bwd) time (median of triton.testing.do_bench) and peak memory
for the loss at the paper's shapes (n=32; d ∈ {1536, 2304, 3584}; 28 and 56 layers) and for the
intervention at (8192 tokens, d=3584) bf16, per provider (lineas_fast, torch eager,
torch.compile). The intervention's achieved bandwidth is reported against the device's copy
bandwidth measured in the same run. Needs CUDA: it refuses to write numbers it did not measure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, write_json  # noqa: E402
from providers import loss_fn, loss_inputs, steer_fn  # noqa: E402

LOSS_SHAPES = [(56, 3584), (28, 1536), (56, 2304), (28, 3584), (28, 2304), (56, 1536)]


def timed(fn, setup=None):
    """(median ms, peak MiB above the baseline) of fn()."""
    from triton.testing import do_bench

    fn()  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak


def bench_loss(provider, n, d, layers):
    xs, ys = loss_inputs(n, d, layers, "cuda")
    fwd = loss_fn(provider, xs, ys)
    rows = {}
    with torch.no_grad() if provider != "lineas_fast" else torch.enable_grad():
        rows["forward"] = timed(lambda: fwd())
    rows["full"] = timed(lambda: fwd().backward())
    loss = fwd()
    rows["backward"] = timed(lambda: loss.backward(retain_graph=True))
    return rows


def bench_steer(provider, tokens, d):
    z = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    om = (torch.rand(d, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(d, device="cuda").requires_grad_()
    fwd = steer_fn(provider, z, om, b)
    g = torch.ones_like(z)
    rows = {}
    with torch.no_grad():
        rows["forward"] = timed(lambda: fwd())
    rows["full"] = timed(lambda: fwd().backward(g))
    y = fwd()
    rows["backward"] = timed(lambda: y.backward(g, retain_graph=True))
    return rows


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9  # GB/s, read + write


def loss_shape(ap, text: str) -> tuple[int, int]:
    """'56x3584' -> (56, 3584), one of LOSS_SHAPES (else an argument error)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if shape not in LOSS_SHAPES:
        ap.error(
            f"--compile-at {text}: not a loss shape of this benchmark (LAYERSxD, one of "
            + ", ".join(f"{la}x{d}" for la, d in LOSS_SHAPES)
            + ")"
        )
    return shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument(
        "--compile-at",
        nargs="+",
        default=None,
        metavar="LAYERSxD",
        help="torch.compile only at these loss shapes, e.g. 56x3584 (its compile "
        "takes minutes per shape); default: every shape",
    )
    add_check_args(ap)
    args = ap.parse_args(argv)
    compile_at = None if args.compile_at is None else {loss_shape(ap, s) for s in args.compile_at}
    providers = ["lineas_fast", "torch_eager"] + ([] if args.no_compile else ["torch_compile"])
    if args.check_args:
        return checked(
            "kernels_gpu.py",
            providers=providers,
            intervention=[8192, 3584, "bfloat16"],
            loss_shapes=LOSS_SHAPES,
            torch_compile_at="every shape" if compile_at is None else sorted(compile_at),
            out=args.out or "bench/results/kernels-<device>.json",
        )
    if not torch.cuda.is_available():
        print("kernels_gpu.py: no CUDA device; GPU numbers are only written from a GPU run")
        return 2
    env = environment()
    name = env["device"].replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"kernels-{name}.json")
    results = []
    tokens, d = 8192, 3584
    bw = copy_bandwidth(tokens * d * 2)

    def save(complete: bool) -> None:  # after each group: a run cut short keeps its rows
        write_json(out, {**env, "copy_bandwidth_GB_per_s": bw, "complete": complete, "results": results})

    for p in providers:
        for mode, (ms, peak) in bench_steer(p, tokens, d).items():
            moved = tokens * d * 2 * (2 if mode == "forward" else 3 if mode == "backward" else 5)
            gbs = moved / (ms * 1e-3) / 1e9
            results.append(
                {
                    "op": "affine_steer",
                    "provider": p,
                    "tokens": tokens,
                    "d": d,
                    "dtype": "bfloat16",
                    "mode": mode,
                    "ms": ms,
                    "peak_mib": peak,
                    "GB_per_s": gbs,
                    "fraction_of_copy_bw": gbs / bw,
                }
            )
            print(results[-1])
    save(False)
    for layers, d in LOSS_SHAPES:  # the target shape first
        for p in providers:
            if p == "torch_compile" and compile_at is not None and (layers, d) not in compile_at:
                continue
            for mode, (ms, peak) in bench_loss(p, 32, d, layers).items():
                results.append(
                    {
                        "op": "loss",
                        "provider": p,
                        "n": 32,
                        "d": d,
                        "layers": layers,
                        "mode": mode,
                        "ms": ms,
                        "peak_mib": peak,
                    }
                )
                print(results[-1])
            save(False)  # after each provider: torch.compile's minutes come last in a shape
    save(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
