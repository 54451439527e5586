"""What per-request steering adds to each steered norm on this machine, outside vLLM: the
plugin's ``SlotSteered`` norms in a decoder-like stack, eager and compiled with Inductor, as
vLLM runs them.

    python bench/slot_op.py [--label NAME] [--out bench/results/slot-op-<device>.json]

The stack: ``LAYERS`` blocks of [norm -> d×d linear] (one linear shared by all), d = 576
(SmolLM2-135M's hidden size), S = 5 slots (two registered steerings), 8 batch rows; T = 1 token
(batch-1 decode) and 32 tokens; every token steered or none; the norms plain (``nn.RMSNorm``) or
wrapped as the plugin wraps them, ungated or DSAS-gated. A steered forward includes the plugin's
per-forward work (the token -> row lookup). Each case's added time per steered norm is (steered
forward − plain forward) / ``LAYERS``, from ``--rounds`` interleaved rounds of ``--calls`` forwards
(median and range over the rounds, µs). Runs append to the result file under their label, with the
commit of the lineas_fast they imported (``code_commit``: put a checkout of another commit on
PYTHONPATH to measure it, the "before" of a change).
Two plugin designs are known: the current one (``slots.TokenTables``, the map as plain tensor code
that Inductor fuses into the norm) and the one before it (an opaque ``lineas_fast::slot_steer`` op
per norm that looked the rows up itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_json  # noqa: E402

D, S, ROWS, LAYERS = 576, 5, 8, 30


class Stack(nn.Module):
    """LAYERS blocks of [norm -> linear]; ``before_forward`` (the plugin's per-forward lookup)
    runs first, outside any compiled region, as vLLM runs the model's top level."""

    def __init__(self, norms, before_forward=None):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.norms = nn.ModuleList(norms)
        # one weight for every layer: it stays in cache, so the timings vary less with the
        # machine's memory traffic than a model's would
        self.linear = nn.Linear(D, D, bias=False)
        self.linear.weight.data = torch.randn(D, D, generator=g) / D**0.5
        self.before_forward = before_forward
        self.body = self._body

    def _body(self, x):
        for norm in self.norms:
            x = self.linear(norm(x))
        return x

    def forward(self, x):
        if self.before_forward is not None:
            self.before_forward(x.shape[0])
        return self.body(x)

    def compile_body(self) -> None:
        self.body = torch.compile(self._body, dynamic=False, fullgraph=True)


def tables(steered: str):
    """(u, b, (gw, gc, gk), row_slot, row_lam): 5 slots, 8 rows + the identity row."""
    g = torch.Generator().manual_seed(0)
    u, b = 0.1 * torch.randn(S, D, generator=g), 0.1 * torch.randn(S, D, generator=g)
    u[0], b[0] = 0.0, 0.0
    gw, gc = torch.randn(S, D, generator=g) / D**0.5, torch.randn(S, generator=g)
    gates = (gw, gc, torch.tensor([0, 1, 1, 2, 2]))  # kinds: none, sigmoid, sigmoid, relu, relu
    slot = torch.zeros(ROWS + 1, dtype=torch.int64)
    lam = torch.zeros(ROWS + 1)
    if steered == "all":
        slot[:ROWS] = torch.arange(ROWS) % (S - 1) + 1
        lam[:ROWS] = 0.5
    return u, b, gates, slot, lam


def steered_stack(tokens: int, steered: str, gated: bool) -> Stack:
    """The stack with every norm wrapped by the plugin's ``SlotSteered`` (either design)."""
    from lineas_fast.serve import slots
    from lineas_fast.serve.vllm_plugin import SlotSteered

    u, b, gates, slot, lam = tables(steered)
    rows = slots.RowTables(ROWS, "cpu")
    rows.slot.copy_(slot)
    rows.lam.copy_(lam)
    token_rows = torch.arange(tokens) % ROWS
    norms = [nn.RMSNorm(D, eps=1e-6) for _ in range(LAYERS)]
    gates = gates if gated else None
    if hasattr(slots, "TokenTables"):  # current design: one lookup per forward
        table = slots.TokenTables(64, "cpu")
        wrapped = [SlotSteered(n, u, b, table, gates) for n in norms]
        return Stack(wrapped, lambda n: table.fill(token_rows[:n], rows))

    # the design before it: the op looked the rows up itself (once per step, then cached)
    def rows_of_this_stack(n, device, identity):
        return token_rows

    return Stack(
        [SlotSteered(n, u, b, rows, gates) for n in norms],
        lambda n: slots.set_token_rows(rows_of_this_stack),
    )


def cases():
    for tokens in (1, 32):
        for steered in ("all", "none"):
            for gated in (False, True):
                yield f"{'gated' if gated else 'map'} T={tokens} {steered}", tokens, steered, gated


def timed(stack: Stack, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(calls):
            stack(x)
        return (time.perf_counter() - t) / calls * 1e6


def measure(calls: int, rounds: int) -> dict:
    results = {}
    for mode in ("eager", "compiled"):
        made = []
        plains = {}
        for name, tokens, steered, gated in cases():
            if tokens not in plains:
                plains[tokens] = Stack([nn.RMSNorm(D, eps=1e-6) for _ in range(LAYERS)])
            stack = steered_stack(tokens, steered, gated)
            stack.load_state_dict(plains[tokens].state_dict(), strict=False)  # same linears
            made.append((name, tokens, stack))
        if mode == "compiled":
            torch._dynamo.reset()
            torch._dynamo.config.cache_size_limit = 64
            for stack in [*plains.values(), *(s for _, _, s in made)]:
                stack.compile_body()
        xs = {t: torch.randn(t, D, generator=torch.Generator().manual_seed(t)) for t in plains}
        for stack_t, stack in [*plains.items(), *((t, s) for _, t, s in made)]:
            timed(stack, xs[stack_t], 5)  # compile / warm up
        per_round: dict[str, list[float]] = {name: [] for name, _, _ in made}
        plain_round: dict[int, list[float]] = {t: [] for t in plains}
        for _ in range(rounds):  # interleaved: each case next to a fresh plain timing
            for name, tokens, stack in made:
                plain = timed(plains[tokens], xs[tokens], calls)
                per_round[name].append((timed(stack, xs[tokens], calls) - plain) / LAYERS)
                plain_round[tokens].append(plain)
        for name, v in per_round.items():
            results[f"{mode} {name}"] = {
                "added_us_per_norm_median": statistics.median(v),
                "added_us_per_norm_min": min(v),
                "added_us_per_norm_max": max(v),
            }
        for tokens, v in plain_round.items():
            results[f"{mode} plain stack T={tokens}"] = {"forward_us_median": statistics.median(v)}
    return results


def code_commit() -> str:
    """The commit of the lineas_fast this run imported (a checkout of another commit on
    PYTHONPATH measures that commit's plugin: the "before" of a change)."""
    import subprocess

    import lineas_fast

    here = os.path.dirname(os.path.abspath(lineas_fast.__file__))
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    git_status = ["git", "status", "--porcelain", "--", "."]
    changed = subprocess.run(git_status, capture_output=True, text=True, cwd=here)
    return (out.stdout.strip() or "unknown") + ("+dirty" if changed.stdout.strip() else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="current")
    ap.add_argument("--calls", type=int, default=200, help="forwards of the stack per timing")
    ap.add_argument("--rounds", type=int, default=7)
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
        "settings": {
            "d": D,
            "slots": S,
            "rows": ROWS,
            "layers": LAYERS,
            "calls": args.calls,
            "rounds": args.rounds,
        },
        "definitions": {
            "added_us_per_norm": "(steered stack forward - plain stack forward) / layers, per round",
            "forward_us_median": "the plain stack's forward (norm + linear per layer)",
        },
        "per_norm": measure(args.calls, args.rounds),
    }
    data["runs"] = [r for r in data["runs"] if r["label"] != args.label] + [run]
    write_json(out, data)
    for name, v in run["per_norm"].items():
        if "forward_us_median" in v:
            print(f"{args.label:>8} {name:<28} forward {v['forward_us_median']:9.1f} µs")
        else:
            mid, lo, hi = (v[f"added_us_per_norm_{k}"] for k in ("median", "min", "max"))
            print(f"{args.label:>8} {name:<28} {mid:8.2f} µs/norm ({lo:.2f}…{hi:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
