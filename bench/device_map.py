"""Training a steering on a model split between the GPU and the CPU by ``device_map``, the path
users take past one GPU; writes bench/results/device-map-<device>.json.

    python bench/device_map.py                          # CUDA: Qwen2.5-1.5B config, bf16
    python bench/device_map.py --tiny --out /tmp/d.json # CPU: the tests' tiny Llama, disk offload

The model is dispatched by accelerate as ``from_pretrained(..., device_map=...)`` does: the
embedding, the final norm and the first ``--gpu-layers`` decoder layers on cuda:0, the other
layers ``"cpu"`` (accelerate keeps their weights in CPU memory and loads them onto the GPU for
each forward, so their maps live on the GPU too). ``--steps`` Adam steps on every
post-attention norm, then the same training on the model held whole on the GPU. Recorded: the
median step time of both, both loss curves and their largest relative difference, the maps'
largest difference, and each map's device. ``--tiny`` runs the tests' 3-layer Llama on the CPU
with layers 1 and 2 offloaded to disk (the same hooks, execution on the CPU).

Exit 1 when a map is not on its module's execution device or the two runs differ beyond
bench/convergence.py's tolerances for the dtype (``run_differences``, ``verdict``): both runs
compute the same operations on the same device with the same weights, but on a GPU some
backward kernels (attention's) accumulate in a run-dependent order, so a bf16 run is compared
as bf16 runs are there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_check_args, checked, environment, meta_parameters, write_json  # noqa: E402
from convergence import run_differences, verdict  # noqa: E402

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


def timed_training(model, tok, src, tgt, steps: int, pattern: str, **kw):
    """(steering, per-step losses, per-step seconds after the first) of ``steps`` + 1 steps."""
    import lineas_fast as lf

    losses, times = [], []
    with lf.Trainer(
        model, tok, src, tgt, modules=pattern, steps=steps + 1, progress=False, optimizer="adam", seed=1, **kw
    ) as run:
        for i in range(steps + 1):
            t0 = time.perf_counter()
            run.step()
            run.read_records()  # synchronises: the step is done
            losses.append(run.history[-1].loss)
            if i:
                times.append(time.perf_counter() - t0)
        st = run.steering.detach()
    return st, losses, times


def device_map_for(model, gpu_layers: int, offload: str, main) -> dict:
    layers = model.config.num_hidden_layers
    dm = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
    dm.update({f"model.layers.{i}": main if i < gpu_layers else offload for i in range(layers)})
    return dm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU, disk offload")
    ap.add_argument("--size", default="1.5B", choices=["1.5B", "7B"])
    ap.add_argument("--gpu-layers", type=int, default=None, help="default: half the layers")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--out", default=None)
    add_check_args(ap)
    args = ap.parse_args(argv)
    from accelerate import dispatch_model

    if args.check_args:
        from trainer_step import qwen_config

        if args.tiny:
            sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
            from tiny_models import tiny_model

            layers = tiny_model("llama").config.num_hidden_layers
        else:
            layers = qwen_config(args.size).num_hidden_layers
        gpu_layers = layers // 2 if args.gpu_layers is None else args.gpu_layers
        if not 0 < gpu_layers < layers:
            ap.error(f"--gpu-layers {gpu_layers}: the split needs 1 to {layers - 1} of {layers} layers")
        return checked(
            "device_map.py",
            model="tests' tiny Llama" if args.tiny else f"Qwen2.5-{args.size} config",
            parameters=None if args.tiny else meta_parameters(qwen_config(args.size)),
            layers=layers,
            gpu_layers=gpu_layers,
            offload="disk" if args.tiny else "cpu",
            steps=args.steps,
            accelerate=dispatch_model.__module__,
            out=args.out or "bench/results/device-map-<device>.json",
        )

    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

        model, tok, src, tgt, pattern = (
            tiny_model("llama"),
            tiny_tokenizer(),
            SOURCE,
            TARGET,
            NORMS["llama"],
        )
        main_dev, offload, label, kw = "cpu", "disk", "tests' tiny Llama, fp32", dict(lr=0.05, batch_size=4)
        dtype = "fp32"
    else:
        if not torch.cuda.is_available():
            print("device_map.py: needs a CUDA device (or --tiny); GPU numbers come only from a GPU run")
            return 2
        from trainer_setup import sentences, word_tokenizer
        from trainer_step import qwen_model

        model, tok = qwen_model(args.size), word_tokenizer()
        src, tgt, pattern = sentences(args.sentences, 1), sentences(args.sentences, 2), PATTERN
        main_dev, offload = 0, "cpu"
        label = f"Qwen2.5-{args.size} config, random weights, bf16"
        dtype = "bf16"
        kw = dict(lr=3e-3, batch_size=args.sentences)
    layers = model.config.num_hidden_layers
    gpu_layers = layers // 2 if args.gpu_layers is None else args.gpu_layers

    whole, whole_loss, whole_t = timed_training(model, tok, src, tgt, args.steps, pattern, **kw)
    model = model.to("cpu")
    with tempfile.TemporaryDirectory() as folder:
        model = dispatch_model(
            model, device_map_for(model, gpu_layers, offload, main_dev), offload_dir=folder
        )
        offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        split, split_loss, split_t = timed_training(model, tok, src, tgt, args.steps, pattern, **kw)
    execution = torch.device("cuda", 0) if main_dev == 0 else torch.device("cpu")
    map_devices = {n: str(split[n][0].device) for n in split.modules}
    diffs = run_differences(split, split_loss, whole, whole_loss)
    problems = [
        f"map of {n} on {d}, its module runs on {execution}"
        for n, d in map_devices.items()
        if torch.device(d) != execution
    ]
    problems += [
        p.replace(f"{dtype}: ", f"{dtype} split vs whole: ", 1)
        for p in verdict(diffs | {"loss_torch": whole_loss}, dtype)
    ]
    if not offloaded:
        problems.append("no weights were offloaded: the device map did not split the model")
    row = {
        "model": label,
        "layers": layers,
        "gpu_layers": gpu_layers,
        "offloaded_to": offload,
        "offloaded_parameters": len(offloaded),
        "steps": args.steps,
        "modules": pattern,
        "whole_step_s": whole_t,
        "split_step_s": split_t,
        "whole_median_s": statistics.median(whole_t),
        "split_median_s": statistics.median(split_t),
        "loss_whole": whole_loss,
        "loss_split": split_loss,
        "dtype": dtype,
        "map_devices": map_devices,
        **diffs,
    }
    print(
        f"{label}: whole {row['whole_median_s']:.3f} s/step, {layers - gpu_layers} of {layers} "
        f"layers offloaded to {offload} {row['split_median_s']:.3f} s/step; loss curves "
        f"{diffs['max_loss_relative_diff']:.1e} apart, map moves "
        f"{diffs['max_move_relative_diff']:.1e} (largest element), "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs["moves_relative_l2"].items())
        + " (L2)",
        flush=True,
    )
    env = environment()
    name = env["device"].replace(" ", "_") if not args.tiny else "cpu-tiny"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"device-map-{name}.json")
    write_json(out, {**env, "problems": problems, "runs": [row]})
    for p in problems:
        print("FAILED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
