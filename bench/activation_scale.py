"""The scale of the activations each quality-sweep model is steered at: the root mean square of
the steered norms' outputs (the maps' z) over the real tokens of the demo's first 32 training
sentences, per model and per layer, with the untouched model.

    python bench/activation_scale.py        # SmolLM2-135M and Gemma-3-270M (if installed), CPU

Writes bench/results/activation-scale-cpu.json. Why it matters: with Adam, the maps' shifts b
move by about lr per step and the sparse group lasso shrinks them by lr·γ per step, in units of
z: a model whose z is larger needs its b to travel further (README "Steering quality").
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402

from lineas_fast.apps import assets  # noqa: E402
from lineas_fast.apps.demo import draw_demo_sentences  # noqa: E402
from lineas_fast.cli.sweep import DEFAULT_MODULES  # noqa: E402
from lineas_fast.targets import as_target  # noqa: E402
from lineas_fast.training.token_acts import token_activations  # noqa: E402


def scale(folder: str, n: int = 32) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    family = model.config.model_type
    target = as_target(model, tok)
    names = target.match(DEFAULT_MODULES[family])
    _, source, _, _ = draw_demo_sentences(n, 1)
    encoded = [tok(s)["input_ids"] for s in source]
    with target.frozen():
        acts = token_activations(target, encoded, names)
    rms = {n: float(a.pow(2).mean().sqrt()) for n, a in acts.items()}
    values = torch.tensor(list(rms.values()))
    return {
        "family": family,
        "modules": DEFAULT_MODULES[family],
        "sentences": n,
        "tokens": int(next(iter(acts.values())).shape[0]),
        "rms_mean_over_layers": float(values.mean()),
        "rms_min": float(values.min()),
        "rms_max": float(values.max()),
        "rms_per_module": rms,
    }


def main() -> int:
    torch.set_grad_enabled(False)
    models = {"smollm2": assets.smollm2_folder()}
    try:
        models["gemma3"] = assets.gemma3_folder()
    except assets.AssetError as e:
        print(f"gemma3 skipped: {e}")
    result = {name: scale(folder) for name, folder in models.items()}
    for name, r in result.items():
        print(
            f"{name}: {r['modules']} RMS mean {r['rms_mean_over_layers']:.3g} "
            f"(layers {r['rms_min']:.3g}–{r['rms_max']:.3g}) over {r['tokens']} tokens"
        )
    if len(result) == 2:
        result["ratio_gemma3_to_smollm2"] = (
            result["gemma3"]["rms_mean_over_layers"] / result["smollm2"]["rms_mean_over_layers"]
        )
        print(f"ratio gemma3/smollm2: {result['ratio_gemma3_to_smollm2']:.3g}")
    write_json(
        os.path.join(os.path.dirname(__file__), "results", "activation-scale-cpu.json"),
        {**environment(), **result},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
