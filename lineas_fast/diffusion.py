"""Steering text-to-image diffusers pipelines built on UNet2DConditionModel (SPEC §1, §3, §6).

A pipeline is seen as one module tree whose names carry the component prefix (``unet.…``,
``text_encoder.…``): ``as_module(pipeline)``. ``DiffusionReader`` gives the trainer pooled
UNet activations: prompts go through the pipeline's own text encoder(s) once; each sample is one
image: the UNet runs once at ``timestep`` on fixed, seeded noise per prompt and each module's
output is averaged over H×W (channels are the coordinates; token-shaped outputs of the UNet's
transformer blocks are averaged over tokens). Training runs without classifier-free guidance,
so every sample is conditional.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from .activations import StopForward, check_texts


def is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "components") and hasattr(obj, "unet")


def as_module(obj) -> nn.Module:
    """An nn.Module view of a diffusers pipeline (its nn.Module components, by name), or the
    object itself. The view shares the pipeline's modules: hooks and folded weights act on it."""
    if not is_pipeline(obj):
        return obj
    view = nn.ModuleDict({k: v for k, v in obj.components.items() if isinstance(v, nn.Module)})
    view.config = getattr(obj.unet, "config", None)
    return view


def pool_image(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → mean over H, W; (B, T, C) → mean over T; (B, C) unchanged. float32."""
    if h.ndim == 4:
        return h.float().mean((2, 3))
    if h.ndim == 3:
        return h.float().mean(1)
    return h.float()


class DiffusionReader:
    """The ``ActivationReader`` interface for a diffusers pipeline.

    Args:
        pipeline: a StableDiffusion(XL)Pipeline-like object with ``unet``, ``encode_prompt``
            and ``scheduler``.
        timestep: the denoising timestep at which activations are read (default: the first
            step of sampling, the scheduler's largest training timestep; pass the one-step
            model's timestep for DMD2-style distillations).
        seed: seeds the per-prompt noise.
        resolution: latent height/width (default: the UNet's ``sample_size``).
        batch_size: prompts per UNet call.
    """

    def __init__(self, pipeline, timestep: int | None = None, seed: int = 0,
                 resolution: int | None = None, batch_size: int = 8,
                 autocast_dtype: torch.dtype | None = None):
        self.pipe = pipeline
        self.unet = pipeline.unet
        self.modules = dict(as_module(pipeline).named_modules())
        sched = pipeline.scheduler
        self.timestep = int(timestep if timestep is not None
                            else sched.config.num_train_timesteps - 1)
        self.seed, self.batch_size = seed, batch_size
        self.res = resolution or self.unet.config.sample_size
        self.autocast_dtype = autocast_dtype
        # a private scheduler whose timesteps include ours, for scale_model_input (the
        # pipeline's own scheduler state is left alone)
        import copy
        self.sched = copy.deepcopy(sched)
        try:
            self.sched.set_timesteps(sched.config.num_train_timesteps)
        except (TypeError, ValueError):
            pass

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, prompts: Sequence[str], what: str = "source") -> dict:
        prompts = check_texts(prompts, f"{what} prompts")
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        enc = {"prompt_embeds": out[0], "n": len(prompts)}
        if len(out) == 4 and out[2] is not None:           # SDXL: pooled embeds + time ids
            enc["text_embeds"] = out[2]
            proj = getattr(self.pipe.text_encoder_2, "config", None)
            size = self.res * self.pipe.vae_scale_factor
            ids = self.pipe._get_add_time_ids((size, size), (0, 0), (size, size),
                                              dtype=out[0].dtype,
                                              text_encoder_projection_dim=getattr(proj, "projection_dim", None))
            enc["time_ids"] = ids.to(self.device).repeat(len(prompts), 1)
        g = torch.Generator().manual_seed(self.seed)
        shape = (len(prompts), self.unet.config.in_channels, self.res, self.res)
        enc["noise"] = torch.randn(shape, generator=g).to(self.device, self.unet.dtype)
        return enc

    def _unet_kwargs(self, enc: dict, idx: list) -> dict:
        # the first sampling step's input: pure noise at the scheduler's initial scale
        latents = enc["noise"][idx] * getattr(self.sched, "init_noise_sigma", 1.0)
        try:
            latents = self.sched.scale_model_input(latents, self.timestep)
        except (AttributeError, IndexError, ValueError, RuntimeError):
            pass                                  # schedulers without input scaling
        kw = {"sample": latents, "timestep": self.timestep,
              "encoder_hidden_states": enc["prompt_embeds"][idx]}
        if "text_embeds" in enc:
            kw["added_cond_kwargs"] = {"text_embeds": enc["text_embeds"][idx],
                                       "time_ids": enc["time_ids"][idx]}
        return kw

    def pooled(self, enc: dict, names: Sequence[str], idx: Sequence[int] | None = None,
               stop: bool = True) -> dict[str, torch.Tensor]:
        idx = list(range(enc["n"])) if idx is None else list(idx)
        outside = [n for n in names if not n.startswith("unet.")]
        if outside:
            raise ValueError(f"diffusion steering reads UNet modules only (unet.*); got {outside[:5]}")
        missing = [n for n in names if n not in self.modules]
        if missing:
            raise ValueError(f"modules {missing[:5]} not found in the pipeline")
        rows = {n: [] for n in names}
        state = {"seen": set()}
        wanted = set(names)

        def hook_for(name):
            def hook(_m, _a, out):
                h = out[0] if isinstance(out, (tuple, list)) else out
                rows[name].append(pool_image(h))
                state["seen"].add(name)
                if stop and state["seen"] == wanted:
                    raise StopForward
            return hook

        handles = [self.modules[n].register_forward_hook(hook_for(n)) for n in names]
        try:
            for i in range(0, len(idx), self.batch_size):
                state["seen"] = set()
                ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                       if self.autocast_dtype else nullcontext())
                with ctx:
                    try:
                        self.unet(**self._unet_kwargs(enc, idx[i:i + self.batch_size]))
                    except StopForward:
                        pass
                if state["seen"] != wanted:
                    raise ValueError(f"modules {sorted(wanted - state['seen'])[:5]} did not run")
        finally:
            for h in handles:
                h.remove()
        return {n: torch.cat(rows[n]) for n in names}


def image_grid(images, rows: int = 1):
    """Paste PIL images of one size into a grid (row-major)."""
    from PIL import Image
    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def strength_sweep(pipeline, steering, prompt: str, strengths: Sequence[float],
                   num_inference_steps: int = 20, seed: int = 0, guidance_scale: float = 7.5,
                   **kwargs):
    """One image per strength (same seed): the steering applied to every UNet call; negative
    strengths apply the inverse map (induce the concept). Returns PIL images."""
    images = []
    for lam in strengths:
        g = torch.Generator(device="cpu").manual_seed(seed)
        with steering.apply(pipeline, strength=lam):
            out = pipeline(prompt, num_inference_steps=num_inference_steps, generator=g,
                           guidance_scale=guidance_scale, **kwargs)
        images.append(out.images[0])
    return images
