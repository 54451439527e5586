"""The per-request slot op's own time per call (``lineas_fast::slot_steer`` and
``slot_steer_gated``) on this machine, outside vLLM: what each steered norm adds to a step.

    python bench/slot_op.py [--label NAME] [--out bench/results/slot-op-<device>.json]

Shapes: d = 576 (SmolLM2-135M's hidden size), S = 5 slots (two registered steerings), 8 batch
rows; T = 1 token (batch-1 decode) and T = 32 tokens; every row steered, or none. Each case is
timed in ``--rounds`` interleaved rounds of ``--calls`` calls after a warm-up; the file keeps the
median and the range of the per-round means in µs per call. Runs append to the result file under
their label, with the commit of the lineas_fast they imported (``code_commit``: put a checkout of
another commit on PYTHONPATH to measure it), so a change is measured before and after in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_json  # noqa: E402

D, S, ROWS = 576, 5, 8


def cases():
    import lineas_fast.serve.slots  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(0)
    u, b = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    u[0], b[0] = 0.0, 0.0
    gw, gc = torch.randn(S, D, generator=g) / D**0.5, torch.randn(S, generator=g)
    gk = torch.tensor([0, 1, 1, 2, 2])
    for tokens in (1, 32):
        z = torch.randn(tokens, D, generator=g)
        rows = torch.arange(tokens) % ROWS
        for steered in ("all", "none"):
            slot = torch.zeros(ROWS + 1, dtype=torch.int64)
            lam = torch.zeros(ROWS + 1)
            if steered == "all":
                slot[:ROWS] = torch.arange(ROWS) % (S - 1) + 1
                lam[:ROWS] = 0.5
            yield (
                f"slot_steer T={tokens} {steered}",
                rows,
                lambda z=z, slot=slot, lam=lam: torch.ops.lineas_fast.slot_steer(z, u, b, slot, lam),
            )
            yield (
                f"slot_steer_gated T={tokens} {steered}",
                rows,
                lambda z=z, slot=slot, lam=lam: torch.ops.lineas_fast.slot_steer_gated(
                    z, u, b, gw, gc, gk, slot, lam
                ),
            )


def measure(calls: int, rounds: int) -> dict:
    from lineas_fast.serve import slots

    made = list(cases())
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in made}
    try:
        for _ in range(rounds):
            for name, rows, fn in made:  # interleaved: every case once per round
                slots.set_token_rows(lambda n, device, identity, rows=rows: rows)
                for _ in range(max(1, calls // 10)):
                    fn()
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_round[name].append((time.perf_counter() - t) / calls * 1e6)
    finally:
        slots.set_token_rows(None)
    return {
        name: {"median_us": statistics.median(v), "min_us": min(v), "max_us": max(v)}
        for name, v in per_round.items()
    }


def code_commit() -> str:
    """The commit of the lineas_fast this run imported (a checkout of another commit on
    PYTHONPATH measures that commit's op: the "before" of a change)."""
    import subprocess

    import lineas_fast

    here = os.path.dirname(os.path.abspath(lineas_fast.__file__))
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    return out.stdout.strip() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="current")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "slot-op-cpu.json")
    data = {"benchmark": "slot_op", "runs": []}
    if os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
    run = {
        "label": args.label,
        **env,
        "code_commit": code_commit(),
        "threads": 1,
        "load_average_1min": os.getloadavg()[0],
        "settings": {"d": D, "slots": S, "rows": ROWS, "calls": args.calls, "rounds": args.rounds},
        "per_call": measure(args.calls, args.rounds),
    }
    data["runs"] = [r for r in data["runs"] if r["label"] != args.label] + [run]
    write_json(out, data)
    for name, v in run["per_call"].items():
        print(f"{args.label:>8} {name:<30} {v['median_us']:8.1f} µs ({v['min_us']:.1f}…{v['max_us']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
