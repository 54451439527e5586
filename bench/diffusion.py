"""Diffusion steering cost: time per LinEAS training step and per generated image (unsteered,
reference hooks, lineas_fast hooks, folded). Writes bench/results/diffusion-<device>.json.

    python bench/diffusion.py            # CPU: the tiny random pipeline of the tests
    python bench/diffusion.py --sdxl     # GPU: an SDXL-sized UNet config, random weights, fp16

The paper's figure to compare with: 1000 LinEAS steps on all UNet norms of DMD2 in 29 min on an
A100 (1.74 s/step).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import add_check_args, checked, environment, write_json  # noqa: E402

import lineas_fast as lf  # noqa: E402

NORMS = r"unet\..*norm\d?"
NOT_RUNNABLE = 69  # exit status: a package the run needs is missing (bench/gpu_run.sh: not runnable)


def sdxl_pipeline():
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from tiny_pipeline import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        )
    )
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=20,
            intermediate_size=5120,
            projection_dim=1280,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    return pipe.to("cuda", torch.float16)


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdxl", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="training steps timed")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per training step (default: all on CPU, 8 with --sdxl: an "
        "SDXL UNet's activations at 128x128 latents for 32 prompts would not "
        "fit in 80 GB)",
    )
    ap.add_argument("--out", default=None)
    add_check_args(ap)
    args = ap.parse_args(argv)
    missing = importlib.util.find_spec("diffusers") is None
    if args.check_args:
        return checked(
            "diffusion.py",
            pipeline="SDXL-sized UNet, fp16" if args.sdxl else "tests' tiny SD pipeline, fp32",
            steps=args.steps,
            batch_size=args.batch_size or (8 if args.sdxl else "all prompts"),
            runnable_here="no: diffusers is not installed (the run would exit 69)" if missing else "yes",
            out=args.out or f"bench/results/diffusion-{'<device>' if args.sdxl else 'cpu'}.json",
        )
    if missing:  # quickly, before any model is built: what the GPU runner records as not runnable
        print(
            "diffusion.py: not runnable here: diffusers is not installed (pip install diffusers; "
            "a machine without a package index: bash bench/gpu_run.sh --fetch-wheels, then carry .whl/)"
        )
        return NOT_RUNNABLE
    if args.sdxl and not torch.cuda.is_available():
        print("diffusion.py: --sdxl needs a CUDA device; GPU numbers come only from a GPU run")
        return 2
    from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline

    pipe = sdxl_pipeline() if args.sdxl else tiny_pipeline()
    src = (SOURCE_PROMPTS * 7)[:32] if args.sdxl else SOURCE_PROMPTS
    tgt = (TARGET_PROMPTS * 6)[:32] if args.sdxl else TARGET_PROMPTS
    batch = args.batch_size or (8 if args.sdxl else len(src))
    stamps = []
    steering = lf.train(
        pipe,
        None,
        src,
        tgt,
        modules=NORMS,
        steps=args.steps + 1,
        optimizer="adam",
        lr=1e-2,
        batch_size=batch,
        progress=False,
        callback=lambda r: stamps.append(time.perf_counter()),
    )
    step_s = statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:]))
    gen_steps = 4 if args.sdxl else 10

    def generate(p):
        g = torch.Generator().manual_seed(0)
        return p("a cat", num_inference_steps=gen_steps, generator=g, output_type="latent")

    rows = {"unsteered": timed(lambda: generate(pipe), 3)}
    mods = lf.as_target(pipe).named
    hs = [
        mods[n].register_forward_hook(
            lambda m, a, out, om=steering[n][0], b=steering[n][1]: (
                out
                + (
                    (om - 1).view(1, -1, *([1] * (out.ndim - 2))) * out
                    + b.view(1, -1, *([1] * (out.ndim - 2)))
                ).to(out.dtype)
                if out.ndim == 4
                else out + ((om - 1) * out + b).to(out.dtype)
            )
        )
        for n in steering.modules
    ]
    rows["reference_hooks"] = timed(lambda: generate(pipe), 3)
    for h in hs:
        h.remove()
    with steering.apply(pipe):
        rows["lineas_hooks"] = timed(lambda: generate(pipe), 3)
    folded = copy.deepcopy(pipe)
    lf.fuse(folded, steering)
    rows["folded"] = timed(lambda: generate(folded), 3)
    result = {
        "pipeline": "SDXL-sized UNet, random weights, fp16"
        if args.sdxl
        else "tiny random SD pipeline (tests/tiny_pipeline.py), fp32",
        "modules": NORMS,
        "n_modules": len(steering),
        "prompts": len(src),
        "batch_size": batch,
        "train_step_s": step_s,
        "generate_s": rows,
        "denoising_steps": gen_steps,
        "paper_dmd2_a100_step_s": 29 * 60 / 1000,
    }
    print(result)
    env = environment()
    name = env["device"].replace(" ", "_") if args.sdxl else "cpu"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"diffusion-{name}.json")
    write_json(out, {**env, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
