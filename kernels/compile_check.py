"""Ahead-of-time compile lane: build every kernel configuration for A100 (sm_80) and H100
(sm_90) with no GPU present, and report their resources.

    python -m lineas_fast.kernels.compile_check [--out bench/results/kernel-resources.json]
                                                [--arch 80 90] [--filter wasserstein]

Each configuration from ``registry.all_configs()`` is compiled by ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``; the PTX is then assembled again by Triton's bundled ``ptxas -v``
for registers per thread, spill stores/loads and static shared memory. Exit status 1 names every
configuration that did not build, and every one serving the paper's shapes (n ≤ 1024, d ≤ 8192)
that spills or exceeds the device's limits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Device limits (CUDA programming guide, compute capability 8.0 and 9.0).
DEVICE_LIMITS = {
    80: {"name": "A100 (sm_80)", "max_shared_bytes": 166912, "max_regs_per_thread": 255,
         "regs_per_sm": 65536},
    90: {"name": "H100 (sm_90)", "max_shared_bytes": 232448, "max_regs_per_thread": 255,
         "regs_per_sm": 65536},
}


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (triton >= 3.6 bundles one per family)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):
        from triton import knobs
        return knobs.nvidia.ptxas.path


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spills and shared memory that ``ptxas -v`` reports for one PTX module."""
    gpu = re.search(r"\.target\s+(sm_\w+)", ptx)
    gpu_name = gpu.group(1) if gpu else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu_name}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()}")

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"),
            "ptxas_smem": grab(r"(\d+) bytes smem")}


def compile_config(cfg, arch: int) -> dict:
    """Compile one configuration; returns its resource row (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps})
    md = compiled.metadata
    row = {"kernel": cfg.name, "config": cfg.label, "arch": arch, "num_warps": md.num_warps,
           "shared_bytes": md.shared, **ptxas_usage(compiled.asm["ptx"], arch)}
    limits = DEVICE_LIMITS[arch]
    problems = []
    if row["spill_stores"] or row["spill_loads"]:
        problems.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["shared_bytes"] > limits["max_shared_bytes"]:
        problems.append(f"shared memory {row['shared_bytes']} B > {limits['max_shared_bytes']} B")
    if row["registers"] * 32 * row["num_warps"] > limits["regs_per_sm"]:
        problems.append(f"{row['registers']} regs x {32 * row['num_warps']} threads > register file")
    row["paper_shapes"] = cfg.paper_shapes
    row["problems"] = problems
    return row


DEFAULT_SOURCE = "lineas_fast.kernels.registry:all_configs"


def load_configs(source: str = DEFAULT_SOURCE) -> list:
    """The configurations listed by ``source``, a "module:function" returning KernelConfigs."""
    import importlib
    module, func = source.split(":")
    return getattr(importlib.import_module(module), func)()


def _compile_one(job) -> tuple[dict | None, str | None]:
    """Worker: (config source, index into it, arch) -> (row, failure)."""
    source, index, arch = job
    cfg = load_configs(source)[index]
    t0 = time.time()
    try:
        row = compile_config(cfg, arch)
    except Exception as e:  # the compiler's message, with the kernel's name
        return None, f"{cfg.label} sm_{arch}: does not compile: {type(e).__name__}: {e}".strip()
    row["compile_s"] = round(time.time() - t0, 2)
    failure = None
    if row["problems"] and cfg.paper_shapes:
        failure = f"{cfg.label} sm_{arch}: " + "; ".join(row["problems"])
    return row, failure


def run(indices, archs, out_path: str | None = None, workers: int = 0, log=print,
        source: str = DEFAULT_SOURCE):
    """Compile configurations ``indices`` of ``source`` for each arch, in ``workers``
    processes (0: one per core). Returns (rows, failures): failures name kernel and reason."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(source, i, a) for a in archs for i in indices]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    rows, failures = [], []
    if workers > 1:
        import multiprocessing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_compile_one, jobs))
    else:
        results = [_compile_one(j) for j in jobs]
    for row, failure in results:
        if failure:
            failures.append(failure)
            log("FAIL " + failure.splitlines()[0])
        if row:
            rows.append(row)
            status = "WARN" if row["problems"] else "ok  "
            log(f"{status} {row['config']} sm_{row['arch']}: {row['registers']} regs, spills "
                f"{row['spill_stores']}/{row['spill_loads']} B, smem {row['shared_bytes']} B, "
                f"{row['compile_s']} s")
    if out_path:
        write_report(rows, failures, archs, out_path)
    return rows, failures


def write_report(rows, failures, archs, out_path: str) -> None:
    import torch
    import triton
    report = {"triton": triton.__version__, "torch": torch.__version__,
              "commit": _git_commit(), "limits": {str(a): DEVICE_LIMITS[a] for a in archs},
              "failures": failures, "kernels": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, out_path)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON resource report here")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(DEVICE_LIMITS))
    ap.add_argument("--filter", default="", help="only configurations whose label contains this")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per core)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot build GPU code)")
        return 2
    indices = [i for i, c in enumerate(load_configs()) if args.filter in c.label]
    if not indices:
        print(f"compile_check: no configuration matches {args.filter!r}")
        return 2
    _, failures = run(indices, args.arch, args.out, args.workers)
    print(f"{len(indices) * len(args.arch) - len(failures)} passed, {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
