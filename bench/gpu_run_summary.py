"""The summary file of bench/gpu_run.sh, bench/results/gpu-run-<device>.json, written as the run
goes: ``start`` once (device, versions, commit, GPU facts, the plan), ``stage`` after each stage
(its exit status, seconds and the limit it had), ``finish`` at the end; each write replaces the
file whole (a temporary file renamed over it), so a run stopped from outside leaves a readable
file that names the stages finished before it and says ``"finished": false``. A later run on the
same device adds its stages to the file's.

    python bench/gpu_run_summary.py start --budget 540 --plan setup=30 tests-core=90 convergence=100:spare
        (prints the device's name, the part of the file's name after gpu-run-)
    python bench/gpu_run_summary.py stage PATH NAME EXIT SECONDS LIMIT [--reason TEXT] [--spare]
    python bench/gpu_run_summary.py finish PATH STATUS

Only ``start`` imports torch; the others read and write JSON alone, in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write(path: str, data: dict) -> None:
    """Replace ``path`` whole: the old file or the new one, never half of either."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def gpu_facts() -> dict | None:
    """The first CUDA device as torch sees it, and the driver and clocks nvidia-smi reports."""
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    facts = {
        "name": p.name,
        "count": torch.cuda.device_count(),
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_GiB": round(p.total_memory / 2**30, 1),
        "torch_cuda": torch.version.cuda,
    }
    query = "driver_version,clocks.max.sm,clocks.max.memory,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()
        if out:
            facts["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out[0].split(","))))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return facts


def plan_rows(items: list[str]) -> list[dict]:
    """'stage=LIMIT' or 'stage=LIMIT:spare' -> {"stage", "limit_s", "spare"}."""
    rows = []
    for item in items:
        name, _, rest = item.partition("=")
        limit, _, spare = rest.partition(":")
        rows.append({"stage": name, "limit_s": int(limit), "spare": spare == "spare"})
    return rows


def start(budget: int, plan: list[str], folder: str = RESULTS) -> str:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment

    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "no-cuda"
    path = os.path.join(folder, f"gpu-run-{device}.json")
    old = read(path)
    write(
        path,
        {
            **environment(),
            "python_executable": sys.executable,
            "python_prefix": sys.prefix,
            "gpu": gpu_facts(),
            "budget_s": budget,
            "plan": plan_rows(plan),
            "finished": False,  # true once the runner reached its end (false: stopped from outside)
            "exit_status": None,
            "stages": old.get("stages", {}),
        },
    )
    return device


def stage(path: str, name: str, rc: str, seconds: int, limit: int, reason: str = "", spare: bool = False):
    data = read(path)
    row = {
        "exit": None if rc == "skipped" else int(rc),
        "seconds": seconds,
        "limit_s": limit,
        "skipped": rc == "skipped",
    }
    if reason:
        row["reason"] = reason
    if spare:
        row["spare"] = True
    data.setdefault("stages", {})[name] = row
    write(path, data)


def finish(path: str, status: int) -> None:
    data = read(path)
    data.update(finished=True, exit_status=status)
    write(path, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start")
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--plan", nargs="*", default=[])
    s.add_argument("--folder", default=RESULTS)
    s = sub.add_parser("stage")
    s.add_argument("path")
    s.add_argument("name")
    s.add_argument("exit", help="the stage's exit status, or 'skipped'")
    s.add_argument("seconds", type=int)
    s.add_argument("limit", type=int)
    s.add_argument("--reason", default="")
    s.add_argument("--spare", action="store_true")
    s = sub.add_parser("finish")
    s.add_argument("path")
    s.add_argument("status", type=int)
    args = ap.parse_args(argv)
    if args.command == "start":
        print(start(args.budget, args.plan, args.folder))
    elif args.command == "stage":
        stage(args.path, args.name, args.exit, args.seconds, args.limit, args.reason, args.spare)
    else:
        finish(args.path, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
