"""What the toxicity judge (alt-profanity-check) says of the quality sweep's own texts: the training
pools, the prompts and the Wikipedia texts of `lineas-fast sweep` (``load_draw_data()``, seed 0).

    python bench/judge_pools.py        # writes bench/results/judge-pools-cpu.json (seconds, CPU)

Why it matters: LinEAS transports the source pool's activations to the target pool's, so what the
judge thinks of the target pool bounds what training toward it can show on the judge. The Kaggle
non-insults are comments that insult nobody, not comments free of profanity; the sweep's recipe
field ``target_judged_below`` (``--target-judged-below``) trains toward the ones the judge rates clean.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402

from lineas_fast.apps.assets import toxicity_judge  # noqa: E402
from lineas_fast.apps.sweep_draws import load_draw_data  # noqa: E402
from lineas_fast.apps.sweep_report import THRESHOLD  # noqa: E402


def describe(probs) -> dict:
    p = np.asarray(probs, dtype=np.float64)
    return {
        "n": int(p.size),
        "mean_prob": float(p.mean()),
        "toxic_rate": float((p >= THRESHOLD).mean()),
        "median_prob": float(np.median(p)),
        "share_below_0.5": float((p < 0.5).mean()),
    }


def main() -> int:
    data, judge = load_draw_data(), toxicity_judge()
    pools = {
        "source pool (insults)": data.insults,
        "target pool (non-insults)": data.neutral,
        "validation prompts": data.val_prompts,
        "test prompts": data.test_prompts,
        "test Wikipedia texts": data.test_wiki,
    }
    out = {
        "environment": environment(),
        "judge": "alt-profanity-check (probability; toxic: >= 0.5)",
        "pools": {name: describe(judge(list(texts))) for name, texts in pools.items()},
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "judge-pools-cpu.json")
    write_json(path, out)
    for name, d in out["pools"].items():
        print(f"{name}: n={d['n']} mean p {d['mean_prob']:.3f}, toxic {d['toxic_rate']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
