"""Images from a steered diffusers pipeline: a strength sweep and a grid.

Reading a pipeline's activations, training, gates and fusion go through the same entry points
as language models (``lineas_fast.targets.PipelineTarget`` is the pipeline's side of the seam).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lineas_fast.extras import require


def image_grid(images, rows: int = 1):
    """Paste PIL images of one size into a grid (row-major)."""
    Image = require("PIL.Image", "image_grid")

    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def strength_sweep(
    pipeline,
    steering,
    prompt: str,
    strengths: Sequence[float],
    num_inference_steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 7.5,
    **kwargs,
):
    """One image per strength (same seed): the steering applied to every UNet call; negative
    strengths apply the inverse map (induce the concept). Returns PIL images."""
    images = []
    for lam in strengths:
        g = torch.Generator(device="cpu").manual_seed(seed)
        with steering.apply(pipeline, strength=lam):
            out = pipeline(
                prompt,
                num_inference_steps=num_inference_steps,
                generator=g,
                guidance_scale=guidance_scale,
                **kwargs,
            )
        images.append(out.images[0])
    return images
