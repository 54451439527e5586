"""Result-file helpers shared by the benchmark scripts: environment facts and atomic JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import torch

from lineas_fast.atomic import atomic_path


def environment() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here
        ).stdout.strip()
    except OSError:  # no git
        commit = dirty = ""
    if not commit:  # a copy of the tree without .git (the device tool): the caller says
        commit = os.environ.get("LINEAS_FAST_COMMIT", "unknown") + " (LINEAS_FAST_COMMIT)"
    return {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit + ("+dirty" if dirty else ""),
    }


# vLLM benchmarks: why a result file has no GPU rows
VLLM_GPU_NOT_RUN = (
    "Not run on a GPU: the GPU machine bench/gpu_run.sh is prepared for has no vLLM installed and "
    "reaches no package registry, so vLLM cannot be installed there."
)


def write_json(path: str, payload: dict) -> None:
    """Write a result file atomically (``lineas_fast.atomic.atomic_path``: the old file or the new
    one, never half of either) and say so."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
    print(f"wrote {path}")
