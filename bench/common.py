"""Result-file helpers shared by the benchmark scripts: environment facts, atomic JSON and the
``--check-args`` option (bench/gpu_run.sh --dry-run runs every stage's script with it)."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import torch


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
    from lineas_fast.atomic import atomic_path  # here: environment() runs before lineas_fast is installed

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def add_check_args(ap) -> None:
    """``--check-args``: parse the arguments and check the run they describe, print it, exit 0;
    no GPU needed, nothing measured or written (``bench/gpu_run.sh --dry-run`` runs each stage's
    script this way on any machine)."""
    ap.add_argument(
        "--check-args",
        action="store_true",
        help="check the arguments, print the run they describe and exit (no GPU needed, nothing written)",
    )


def checked(script: str, **plan) -> int:
    """Print what a ``--check-args`` run found (one line, JSON values) and return exit status 0."""
    print(f"{script} --check-args: ok: " + json.dumps(plan, default=str))
    return 0


def meta_parameters(config) -> int:
    """Parameters of a transformers causal LM built from ``config`` on the meta device: no memory,
    no weights; checks that this transformers accepts the config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
