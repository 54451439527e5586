"""Copy `lineas-fast sweep` folders into bench/results with the machine, versions and commit,
and print the README's tables.

    python bench/quality_results.py SWEEP_DIR NAME [SWEEP_DIR NAME ...]

writes bench/results/quality-NAME.json (sweep.json plus an "environment" entry) and
quality-NAME.png (its Pareto plot, redrawn; with 95% interval bars for a sweep over draws), then prints
each sweep's table (every row; the Pareto front's rows marked ◆; rows meeting the target marked ✓; for
a sweep over draws, the intervals, draws × seeds × prompts, and the row chosen on validation ★).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment  # noqa: E402

from lineas_fast.apps.sweep import format_table, plot_pareto  # noqa: E402
from lineas_fast.apps.sweep_report import format_interval_table, plot_pareto_intervals  # noqa: E402
from lineas_fast.atomic import atomic_path  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NOTE = (
    "fp32, one seed, a shared 2-core machine; sweep rows from several `lineas-fast sweep` "
    "runs into one folder (same data and evaluation settings)"
)
NOTE_DRAWS = (
    "fp32, a shared 2-core machine; every row over the sweep's training draws and generation seeds, "
    "with 95% bootstrap intervals (settings in 'settings'); rows from the `lineas-fast sweep` runs "
    "into one folder (same data and evaluation settings)"
)


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    env = environment()
    for folder, name in zip(argv[::2], argv[1::2]):
        with open(os.path.join(folder, "sweep.json")) as f:
            res = json.load(f)
        res["environment"] = {**env, "note": NOTE_DRAWS if with_intervals(res) else NOTE}
        with atomic_path(os.path.join(RESULTS, f"quality-{name}.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
        plot = plot_pareto_intervals if with_intervals(res) else plot_pareto
        plot(res, os.path.join(RESULTS, f"quality-{name}.png"))
        print(f"### {name}\n")
        print(marked_table(res) + "\n")
    return 0


def with_intervals(res: dict) -> bool:
    """A sweep over draws and generation seeds (``lineas-fast sweep`` since issue #31), with
    intervals, rather than a single-draw one."""
    return res.get("settings", {}).get("protocol") is not None


def marked_table(res: dict) -> str:
    """The sweep's markdown table, every row; Pareto-front rows marked ◆, rows meeting the target ✓
    (a sweep with intervals: its 95% intervals and draws × seeds × prompts per row; the row chosen
    on validation as the best marked ★)."""
    if with_intervals(res):
        table = format_interval_table(res).split("\n")
        if res.get("best") is not None:
            i = res["best"]
            table[i + 2] = table[i + 2].replace("| ", "| ★ ", 1)
    else:
        table = format_table(res).split("\n")
    front, ok = set(res["pareto"]), set(res["meets_target"])
    for i in range(len(res["rows"])):
        mark = ("◆" if i in front else "") + ("✓" if i in ok else "")
        if mark:
            table[i + 2] = table[i + 2].replace("| ", f"| {mark} ", 1)
    return "\n".join(table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
