"""Probes behind the README's demo analysis: reuse the maps a demo run trained and evaluate
variants without retraining (toxicity of continuations on the demo's held-out prompts, Wikipedia
perplexity).

    lineas-fast demo --out lineas_demo
    python bench/demo_probes.py --demo lineas_demo

* strengths and layer subsets: λ = 0.75; maps only on layers 0–14, 15–29, 0–9 (PPL on all 200
  extracts);
* DSAS gates: gates fitted with every module gated, then every gate's bias raised by 2 and 4
  (PPL on the first 60 extracts), and the ungated maps at λ = 1 for comparison; the mean gate
  strength on the continuations is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="lineas_demo", help="output folder of `lineas-fast demo`")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lineas_fast as lf
    from lineas_fast.apps.assets import smollm2_folder, toxicity_judge
    from lineas_fast.apps.demo import load_demo_data
    from lineas_fast.apps.eval import continuations, perplexity, toxicity

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data, judge = load_demo_data(n_train=32, n_wiki=200), toxicity_judge()
    st = lf.Steering.load(os.path.join(args.demo, "steering.safetensors"))

    def evaluate(name, steering, strength, n_wiki=None):
        with steering.apply(model, strength=strength, record_strengths=True) as h:
            texts = continuations(model, tok, data.prompts, 20)
        with steering.apply(model, strength=strength):
            ppl = perplexity(model, tok, data.wiki[:n_wiki])
        strengths = [x.flatten() for v in h.strengths.values() for x in v]
        mean = torch.cat(strengths).mean().item() if strengths else 0.0
        print(f"{name}: {toxicity(texts, judge)}, PPL {ppl:.2f}, mean strength {mean:.3f}", flush=True)

    def only(lo, hi):
        return {m: (1.0 if lo <= int(m.split(".")[2]) < hi else 0.0) for m in st.modules}

    evaluate("lambda 0.75", st, 0.75)
    for lo, hi in ((0, 15), (15, 30), (0, 10)):
        evaluate(f"layers {lo}-{hi - 1}", st, only(lo, hi))
    gated = lf.fit_gates(model, tok, data.source, data.control, st, threshold=0.0)
    evaluate("gates, all modules", gated, 1.0, 60)
    for shift in (2.0, 4.0):
        moved = lf.Steering(
            {n: st[n] for n in st.modules},
            st.metadata,
            {n: {**g, "c": g["c"] + shift} for n, g in gated.gates.items()},
        )
        evaluate(f"gates, c + {shift:g}", moved, 1.0, 60)
    evaluate("ungated, lambda 1", st, 1.0, 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
