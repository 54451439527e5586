"""``lineas-fast generate-image``: a grid PNG of a strength sweep of a diffusers pipeline."""

from __future__ import annotations

from lineas_fast.apps.diffusion import image_grid, strength_sweep
from lineas_fast.atomic import atomic_path
from lineas_fast.cli.argtypes import SEED, integer, nonblank, real
from lineas_fast.cli.dtypes import add_dtype
from lineas_fast.cli.folders import add_allow_missing, check_pipeline_dir, fits, load_pipeline
from lineas_fast.cli.paths import check_output_file
from lineas_fast.cli.readers import load_steering

NAME = "generate-image"
HELP = "a grid PNG of a strength sweep (diffusers)"
DESCRIPTION = (
    "Generate one image per strength with the same seed and save them side by side; negative "
    "strengths induce the concept."
)


def add_arguments(i) -> None:
    i.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    i.add_argument("--steering", required=True)
    i.add_argument("--prompt", type=nonblank, required=True)
    i.add_argument("--strengths", type=real(), nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    i.add_argument("--steps", type=integer(1), default=20, help="denoising steps")
    i.add_argument("--guidance", type=real(), default=7.5)
    i.add_argument("--seed", type=SEED, default=0)
    i.add_argument("--out", required=True, help="PNG file to write")
    add_dtype(i)
    add_allow_missing(i)


def run(args) -> int:
    check_pipeline_dir(args.pipeline)
    check_output_file(
        args.out, "--out", {"--pipeline": args.pipeline, "--steering": args.steering}, suffix=".png"
    )
    steering = load_steering(args.steering)
    pipe = load_pipeline(args.pipeline, args.allow_missing_weights, args.dtype)
    fits(steering, pipe, args, "--pipeline")
    images = strength_sweep(pipe, steering, args.prompt, args.strengths, args.steps, args.seed, args.guidance)
    with atomic_path(args.out) as tmp:
        image_grid(images).save(tmp, format="PNG")
    print(f"wrote {args.out} (strengths {args.strengths})")
    return 0
