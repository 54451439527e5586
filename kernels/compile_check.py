"""Ahead-of-time compile lane: build every kernel configuration for A100 (sm_80) and H100
(sm_90) with no GPU present, exactly as the JIT builds it at launch, and report what the
compiler emitted.

    python -m lineas_fast.kernels.compile_check [--out bench/results/kernel-resources.json]
                                                [--arch 80 90] [--filter affine]

**Run-time specialisation.** At a launch Triton's JIT specialises the kernel on its arguments:
pointers 16-byte aligned and integers divisible by 16 get ``tt.divisibility = 16``, integers
equal to 1 become constants. ``jit_specialization`` runs the JIT's own binder
(``create_function_from_signature``, the function ``JITFunction.run`` calls) and its own
``_pack_args`` on example arguments (tiny CPU tensors of the configuration's dtypes, whose
storage is aligned as CUDA allocations are, and the integer values in ``KernelConfig.values``),
so the ``ASTSource`` built here carries the signature, constants and attributes a launch with
those values carries, under triton 3.6 and 3.9 alike.

**What is recorded** (per configuration and arch), from the cubin Triton produced:
``cuobjdump -res-usage`` (registers, local and shared memory), ``cuobjdump -sass`` (static SASS
instruction count; barriers ``BAR.*``; shuffles ``SHFL.*``; shared-memory loads and stores;
local loads/stores ``LDL``/``STL``; the same counts inside loops, found from backward branches)
and the log of the very ``ptxas -v`` run that built the cubin (spill bytes, stack frame).
Per element: a program's code handles ``KernelConfig.elements``
elements per pass (its tile; one loop iteration for a looping kernel), so warp instructions per
element = instructions per pass × num_warps / elements, and shared bytes per element =
metadata.shared / elements. These are static counts, not measurements.

**Budgets.** ``registry.BUDGETS`` sets, per kernel, the most barriers, shuffles, shared bytes
and warp instructions per element that its restructured code needs at the paper's shapes.
Exit status 1 names every configuration that did not build, and every one serving the paper's
shapes that spills, exceeds the device's limits or its budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Device limits (CUDA programming guide, compute capability 8.0 and 9.0).
DEVICE_LIMITS = {
    80: {
        "name": "A100 (sm_80)",
        "max_shared_bytes": 166912,
        "max_regs_per_thread": 255,
        "regs_per_sm": 65536,
    },
    90: {
        "name": "H100 (sm_90)",
        "max_shared_bytes": 232448,
        "max_regs_per_thread": 255,
        "regs_per_sm": 65536,
    },
}

_TORCH_DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp64": "float64",
    "i32": "int32",
    "i64": "int64",
    "i8": "int8",
    "u8": "uint8",
    "i1": "bool",
}
DEFAULT_INT = 4096  # an int argument without an example value: a paper-shape size (16 | n)


def _tool(name: str) -> str:
    """Path of the NVIDIA tool Triton bundles (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def example_args(cfg) -> list:
    """Run-time arguments standing for a launch of ``cfg``: a 1-element CPU tensor per pointer
    (its dtype from the signature; torch aligns CPU storage to ≥ 16 bytes, as the caching
    allocator aligns CUDA storage), ``cfg.values`` or ``DEFAULT_INT`` per int, ``cfg.values``
    or 0.5 per float, and the constexprs by name."""
    import torch

    args = []
    for name in cfg.kernel.arg_names:
        ty = cfg.signature.get(name, "constexpr")
        if ty == "constexpr":
            args.append(cfg.constexprs[name])
        elif ty.startswith("*"):
            t = torch.empty(4, dtype=getattr(torch, _TORCH_DTYPES[ty[1:]]))
            if t.data_ptr() % 16:
                raise RuntimeError(f"example tensor for {name} is not 16-byte aligned")
            args.append(t)
        elif ty.startswith(("i", "u")):
            args.append(int(cfg.values.get(name, DEFAULT_INT)))
        else:
            args.append(float(cfg.values.get(name, 0.5)))
    return args


def jit_specialization(cfg, arch: int):
    """(ASTSource, options dict, specialization list) that ``JITFunction.run`` would build for
    ``example_args(cfg)`` with ``num_warps=cfg.num_warps`` on an sm_``arch`` device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = cfg.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"num_warps": cfg.num_warps}
    bound_args, specialization, options = binder(*example_args(cfg), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, specialization


class _FakeDriver:
    """Just enough of a Triton driver for ``JITFunction.run`` to bind and specialise arguments
    for an sm_``arch`` device that is not there (used with ``jit_cache_hook`` to stop it before
    compiling or launching)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return "compile_check-fake-device"

    def get_current_stream(self, device=None):
        return 0


def jit_run_specialization(cfg, arch: int) -> dict:
    """What ``JITFunction.run`` itself hands to the compiler for a launch with
    ``example_args(cfg)``: {"signature", "constants", "attrs"}, captured by the JIT's
    ``jit_cache_hook`` under a fake sm_``arch`` driver (nothing is compiled or launched). The
    independent check of ``jit_specialization``."""
    from triton import knobs
    from triton.runtime import driver

    kernel = cfg.kernel
    seen = {}

    def hook(*, compile, **_):
        seen.update(
            signature=compile["signature"], constants=compile["constants"], attrs=compile["configs"][0]
        )
        return True  # skip compiling

    fake = _FakeDriver(arch)
    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(fake)
    knobs.runtime.jit_cache_hook = hook
    try:
        kernel.run(*example_args(cfg), grid=(1,), warmup=True, num_warps=cfg.num_warps)
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver  # reset_active() would build the real (absent) driver
        kernel.device_caches.pop(fake.get_current_device(), None)
    return seen


def compile_with_ptxas_log(src, arch: int, options: dict):
    """``triton.compile`` with the log of the very ``ptxas -v`` run that produced the cubin
    (Triton prints it when ``knobs.nvidia.dump_ptxas_log`` is set; its on-disk cache is
    bypassed so ptxas runs). Returns (compiled kernel, log text)."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, out.getvalue()


def ptxas_spills(log: str) -> dict:
    """Spill stores/loads (bytes) and stack frame from a ``ptxas -v`` log: register-pressure
    spills, told apart from a call's stack frame (both show as STL/LDL in SASS)."""

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    if "Used" not in log:
        raise RuntimeError(f"no ptxas -v report in the compile log: {log[-500:]!r}")
    return {
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": grab(r"(\d+) bytes stack frame"),
    }


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, opcode, text)] of every instruction, the trailing NOP/self-branch padding
    left out; the opcode keeps its modifiers (``BAR.SYNC.DEFER_BLOCKING``)."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        text = m.group(2).strip()
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        out.append((int(m.group(1), 16), op, text))
    while out and (out[-1][1] == "NOP" or (out[-1][1] == "BRA" and out[-1][2].endswith(hex(out[-1][0])))):
        out.pop()
    return out


def _loop_ranges(instrs) -> list[tuple[int, int]]:
    """Address ranges [target, branch] of backward branches (loop bodies)."""
    ranges = []
    for addr, op, text in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text.split(op, 1)[1])
            if m and int(m.group(1), 16) < addr:
                ranges.append((int(m.group(1), 16), addr))
    return ranges


def _counts(instrs) -> dict:
    ops = [op for _, op, _ in instrs]
    return {
        "instructions": len(ops),
        "barriers": sum(op.startswith("BAR") for op in ops),
        "shuffles": sum(op.startswith("SHFL") for op in ops),
        "shared_ops": sum(op.startswith(("LDS", "STS", "LDSM", "STSM", "ATOMS")) for op in ops),
        "local_stores": sum(op.startswith("STL") for op in ops),
        "local_loads": sum(op.startswith("LDL") for op in ops),
    }


def sass_stats(sass: str) -> dict:
    """Static counts over the whole kernel and inside its loops (``loop_*``)."""
    instrs = parse_sass(sass)
    ranges = _loop_ranges(instrs)
    in_loop = [i for i in instrs if any(lo <= i[0] <= hi for lo, hi in ranges)]
    stats = _counts(instrs)
    stats.update(
        {
            f"loop_{k}": v
            for k, v in _counts(in_loop).items()
            if k in ("instructions", "barriers", "shuffles", "shared_ops")
        }
    )
    stats["loops"] = len(ranges)
    return stats


def cubin_stats(cubin: bytes) -> dict:
    """Resource usage and SASS counts of one cubin, read with the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if res.returncode or sass.returncode:
        raise RuntimeError(f"cuobjdump failed: {(res.stderr + sass.stderr).strip()}")

    def grab(key):
        m = re.search(rf"\b{key}:(\d+)", res.stdout)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab("REG"),
        "local_bytes": grab("LOCAL"),
        "stack_bytes": grab("STACK"),
        **sass_stats(sass.stdout),
    }


def compile_config(cfg, arch: int) -> dict:
    """Compile one configuration as the JIT would; returns its resource row (raises on a
    compile error)."""
    from .registry import budget_for

    src, options, spec = jit_specialization(cfg, arch)
    compiled, log = compile_with_ptxas_log(src, arch, options)
    md = compiled.metadata
    stats = {**cubin_stats(compiled.asm["cubin"]), **ptxas_spills(log)}
    elements = cfg.tile_elements
    per_pass = stats["loop_instructions"] if stats["loops"] else stats["instructions"]
    row = {
        "kernel": cfg.name,
        "config": cfg.label,
        "arch": arch,
        "num_warps": md.num_warps,
        "elements": elements,
        "shared_bytes": md.shared,
        **stats,
        "warp_instructions_per_element": round(per_pass * md.num_warps / elements, 4),
        "shared_bytes_per_element": round(md.shared / elements, 4),
        "specialization": {
            "divisible_by_16": [
                n
                for n, (ty, *rest) in zip(cfg.kernel.arg_names, spec)
                if ty != "constexpr" and rest and rest[0] and "D" in rest[0]
            ],
            "constant_ones": [
                n
                for n, (ty, *rest) in zip(cfg.kernel.arg_names, spec)
                if ty == "constexpr" and n not in cfg.constexprs
            ],
        },
    }
    limits = DEVICE_LIMITS[arch]
    problems = []
    if row["spill_store_bytes"] or row["spill_load_bytes"]:
        problems.append(
            f"spills {row['spill_store_bytes']} B stores / "
            f"{row['spill_load_bytes']} B loads ({row['local_stores']} STL, "
            f"{row['local_loads']} LDL in SASS)"
        )
    if row["shared_bytes"] > limits["max_shared_bytes"]:
        problems.append(f"shared memory {row['shared_bytes']} B > {limits['max_shared_bytes']} B")
    if row["registers"] * 32 * row["num_warps"] > limits["regs_per_sm"]:
        problems.append(f"{row['registers']} regs x {32 * row['num_warps']} threads > register file")
    budget = budget_for(cfg)
    if budget is not None:
        row["budget"] = budget.name
        problems += budget.violations(row)
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


def run(
    indices, archs, out_path: str | None = None, workers: int = 0, log=print, source: str = DEFAULT_SOURCE
):
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
            log(
                f"{status} {row['config']} sm_{row['arch']}: {row['registers']} regs, "
                f"{row['barriers']} bar ({row['loop_barriers']} in loops), "
                f"{row['shuffles']} shfl, {row['warp_instructions_per_element']} warp-instr/elem, "
                f"smem {row['shared_bytes']} B, spills {row['spill_store_bytes']}/"
                f"{row['spill_load_bytes']} B, {row['compile_s']} s"
            )
    if out_path:
        write_report(rows, failures, archs, out_path)
    return rows, failures


def write_report(rows, failures, archs, out_path: str) -> None:
    import torch
    import triton

    from .registry import BUDGETS

    report = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "archs": [f"sm_{a}" for a in archs],
        "limits": {str(a): DEVICE_LIMITS[a] for a in archs},
        "budgets": [b.describe() for b in BUDGETS],
        "note": "static counts from the cubins the JIT would build (run-time "
        "specialisation applied); not measurements",
        "failures": failures,
        "kernels": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, out_path)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON resource report here")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(DEVICE_LIMITS))
    ap.add_argument("--filter", default="", help="only configurations whose label contains this")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per core)")
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="module:function listing the configurations")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot build GPU code)")
        return 2
    indices = [i for i, c in enumerate(load_configs(args.source)) if args.filter in c.label]
    if not indices:
        print(f"compile_check: no configuration matches {args.filter!r}")
        return 2
    _, failures = run(indices, args.arch, args.out, args.workers, source=args.source)
    print(f"{len(indices) * len(args.arch) - len(failures)} passed, {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
