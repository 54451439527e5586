"""The one seam between lineas_fast and what it steers: a causal LM or a diffusers pipeline.

``as_target(model_or_pipeline, tokenizer)`` builds a ``Target`` once; every entry point
(``train``, ``fit_linear_act``, ``fit_gates``, ``fuse``, ``fuse_in_memory``,
``Steering.attach/validate``) takes the model, the pipeline or the target and goes through it.
A target owns:

* ``root``: the module tree whose ``named_modules()`` names the maps use (the model itself; for
  a pipeline a view of its ``nn.Module`` components, names prefixed ``unet.…``,
  ``text_encoder.…``; the view shares the pipeline's modules, so hooks and folded weights act on
  the pipeline);
* ``encode(texts)``: sentences to token ids (LM) or prompts to text embeddings and fixed seeded
  noise (pipeline); a target with ``shared_noise`` (pipelines) also gives ``draw_noise`` and
  ``with_noise``, so training runs each step's source and target samples on one fresh noise;
* ``pooled(encoded, names)``: THE capture loop (hooks at the named modules, the forward stopped
  right after the last one, "module did not run" errors), parameterised by the target's pooling:
  sentence mean over real tokens, image mean over H×W (``lineas_fast.pooling``);
* ``fingerprint()``: what identifies the architecture (a saved steering is checked against it);
* ``resolve(steering)``: a steering's names in ``root``'s namespace (a pipeline's ``unet.…``
  steering applied to ``pipeline.unet`` loses the prefix).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lineas_fast import placement
from lineas_fast.checks import ArgumentError, integer
from lineas_fast.modules import match_modules, nearby_names
from lineas_fast.pooling import length_buckets, masked_mean, pack_rows, pad_right, pool_image, segment_means


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass after the last module needed."""


def check_texts(texts, what: str) -> list[str]:
    """The texts as a list, or a ValueError naming the empty list or the bad entries."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{what}: expected a list of strings, got one {type(texts).__name__} (wrap it in a list)"
        )
    if isinstance(texts, Mapping) or not isinstance(texts, Iterable):
        raise TypeError(f"{what}: expected a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what}: empty list of {'prompts' if 'prompt' in what else 'sentences'}")
    bad = [i for i, s in enumerate(texts) if not isinstance(s, str) or not s.strip()]
    if bad:
        raise ValueError(f"{what}: entries {bad[:10]} are empty or not strings")
    return texts


def is_pipeline(obj) -> bool:
    """A diffusers pipeline: not a module itself, has components and a UNet."""
    return not isinstance(obj, nn.Module) and hasattr(obj, "components") and hasattr(obj, "unet")


def fingerprint_of(root: nn.Module) -> dict:
    """What identifies a module tree's architecture and size (not its weights): its config's
    model_type and a hash of every parameter's name and shape."""
    cfg = getattr(root, "config", None)
    shapes = [(n, tuple(p.shape)) for n, p in root.named_parameters()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {
        "model_type": getattr(cfg, "model_type", type(root).__name__),
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "shapes_sha256": digest,
    }


class Target:
    """A module tree to steer (see the module docstring). Subclasses add ``encode`` and the
    batches of the capture loop; this base serves hooks, validation and fusion."""

    kind = "module"
    #: Capability: a training step draws fresh noise shared by its source and target samples
    #: (``draw_noise`` and ``with_noise``) and reads the target activations under it every step,
    #: instead of reading them once. False here: a language model's activations are a function
    #: of the text alone, so its target is read once.
    shared_noise = False

    def __init__(self, original, root: nn.Module):
        self.original, self.root = original, root
        self.named: dict[str, nn.Module] = dict(root.named_modules())

    # --- names ------------------------------------------------------------------------------
    def match(self, pattern: str, what: str = "modules") -> list[str]:
        """Names that ``re.fullmatch`` ``pattern``, in model order (error lists nearby names)."""
        return match_modules(self.root, pattern, what)

    def require(self, names: Sequence[str], what: str = "modules") -> None:
        missing = [n for n in names if n not in self.named]
        if missing:
            raise ValueError(
                f"{what} {missing[:5]} missing from {type(self.root).__name__}; "
                f"nearby names: {nearby_names(list(self.named), missing[0])}"
            )

    def resolve(self, steering):
        """``steering`` with its names in ``root``'s namespace: unchanged when they are found;
        without a component prefix ("unet.") when the target is that component alone."""
        if not steering.modules or any(n in self.named for n in steering.modules):
            return steering
        prefix = steering.modules[0].split(".", 1)[0] + "."
        if all(n.startswith(prefix) and n[len(prefix) :] in self.named for n in steering.modules):
            return steering.strip_prefix(prefix)
        return steering

    def fingerprint(self) -> dict:
        return fingerprint_of(self.root)

    # --- state --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the first weights' device, or accelerate's execution device for an
        offloaded model (see ``placement``); the CPU for a tree without weights."""
        return placement.input_device(self.root) or torch.device("cpu")

    def module_device(self, name: str) -> torch.device:
        """Where a module runs (its map is created there): its weights' device, or the
        execution device of accelerate's hook for a module offloaded by ``device_map`` (weights
        on the meta device between forwards)."""
        return placement.module_device(self.named, name) or self.device

    @contextlib.contextmanager
    def frozen(self):
        """Eval mode and no weight gradients inside; every flag restored after."""
        flags = {p: p.requires_grad for p in self.root.parameters()}
        modes = {m: m.training for m in self.root.modules()}
        self.root.eval()
        for p in flags:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for m, mode in modes.items():
                m.training = mode

    # --- reading activations -----------------------------------------------------------------
    def encode(self, texts: Sequence[str], what: str = "sentences"):
        raise ValueError(
            f"{type(self.root).__name__} was given without a tokenizer: a tokenizer "
            f"is needed to read activations of a language model (pass None only "
            f"for diffusers pipelines)"
        )

    def count(self, encoded) -> int:
        raise NotImplementedError

    def batches(
        self, encoded, idx: list[int]
    ) -> Iterator[tuple[list[int], Callable[[], None], Callable[[torch.Tensor], torch.Tensor]]]:
        """Yield (positions in ``idx``, run the forward, pool one module output → (B, d))."""
        raise NotImplementedError

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, ...) noise for ``n`` samples from ``generator`` (targets with ``shared_noise``)."""
        raise NotImplementedError(f"{type(self).__name__} reads no noise (shared_noise is False)")

    def with_noise(self, encoded, idx: Sequence[int], noise: torch.Tensor):
        """The samples ``idx`` of ``encoded`` (repeats allowed), sample i on ``noise[i]``, as an
        encoded set of len(idx) samples (targets with ``shared_noise``)."""
        raise NotImplementedError(f"{type(self).__name__} reads no noise (shared_noise is False)")

    def autocast(self):
        dtype = getattr(self, "autocast_dtype", None)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, encoded, names: Sequence[str]) -> None:
        """Called by ``pooled`` before its hooks go in (a language model decides once whether
        it can read packed sentences)."""

    def pooled(
        self, encoded, names: Sequence[str], idx: Sequence[int] | None = None, stop: bool = True
    ) -> dict[str, torch.Tensor]:
        """Pooled (len(idx), d) float32 activations at each module in ``names``, rows in the
        order of ``idx``. With ``stop`` the forward ends right after the last module read.
        Gradients flow when the caller has grad enabled (training).

        Each forward's pooled rows are kept as one (B, d) piece per module; the pieces are
        joined with one ``cat`` and, when the batches reorder ``idx``, one row gather."""
        idx = list(range(self.count(encoded))) if idx is None else list(idx)
        names = list(names)
        self.require(names)
        self.prepare(encoded, names)
        pieces: dict[str, list] = {n: [] for n in names}
        order: list[int] = []
        state: dict = {"pool": None, "out": {}}
        wanted = set(names)

        def hook_for(name):
            def hook(_mod, _args, out):
                h = out[0] if isinstance(out, (tuple, list)) else out
                state["out"][name] = state["pool"](h)  # a module run twice: the last wins
                if stop and state["out"].keys() == wanted:  # every module read: skip the rest
                    raise StopForward

            return hook

        handles = [self.named[n].register_forward_hook(hook_for(n)) for n in names]
        try:
            for positions, run, pool in self.batches(encoded, idx):
                state.update(pool=pool, out={})
                with self.autocast():
                    try:
                        run()
                    except StopForward:
                        pass
                if state["out"].keys() != wanted:
                    raise ValueError(
                        f"modules {sorted(wanted - state['out'].keys())[:5]} did not "
                        f"run in the forward pass of {type(self.root).__name__}"
                    )
                for n in names:
                    pieces[n].append(state["out"][n])
                order.extend(positions)
        finally:
            for h in handles:
                h.remove()
        out = {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in pieces.items()}
        if order != list(range(len(idx))):
            where = torch.empty(len(order), dtype=torch.long)
            where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            out = {n: v[where.to(v.device)] for n, v in out.items()}
        return out

    def execution_order(self, encoded, names: Sequence[str]) -> list[str]:
        """Module names in the order the forward pass runs them (one short pass)."""
        order: list[str] = []
        hooks = [
            self.named[n].register_forward_hook(
                lambda _m, _a, _o, n=n: order.append(n) if n not in order else None
            )
            for n in names
        ]
        try:
            with torch.no_grad():
                self.pooled(encoded, names, idx=[0], stop=True)
        finally:
            for h in hooks:
                h.remove()
        return order


class LanguageModelTarget(Target):
    """A transformers causal LM (or any module taking input_ids/attention_mask) and its
    tokenizer. One sample is one sentence (mean over its real tokens). Sentences are truncated
    to ``max_length`` tokens.

    Batches are packed: sentences placed end to end in rows (first-fit decreasing, a row as
    long as the longest sentence), each restarting its ``position_ids`` at 0, with a 4-D
    block-diagonal causal mask (transformers passes a 4-D mask to the attention as it is: bool
    for "sdpa", additive for "eager"), so each sentence sees only itself. A batch then holds
    almost no padding and goes through the model in one forward (up to ``MAX_TOKENS`` tokens),
    and one (n, R·L) matmul pools every sentence at a module. Packing needs a transformers
    config with ``_attn_implementation`` "sdpa" or "eager", and sentences no longer than the
    config's ``sliding_window`` (within it a sliding and a full causal mask agree); then, with
    ``packing=None`` (default), a check on the first read that the model gives two sentences
    packed in one row the activations it gives them apart (at the modules read). Otherwise
    batches are length buckets with a 2-D attention mask. ``packing=False``: always buckets;
    ``packing=True``: packs where the config allows it, without the check."""

    kind = "language_model"
    MAX_TOKENS = 8192  # tokens (padding included) per packed forward
    MAX_SENTENCES = 512  # sentences per packed forward (the pooling matrix is n × tokens)

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = 128,
        autocast_dtype: torch.dtype | None = None,
        packing: bool | None = None,
    ):
        super().__init__(model, model)
        if packing not in (None, True, False):
            raise TypeError(f"packing must be None, True or False, got {packing!r}")
        self.packing, self._capacity = packing, None
        integer(max_length, "max_length", low=1)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and max_length > positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_position_embeddings={positions}"
            )
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer, self.max_length, self.autocast_dtype = tokenizer, int(max_length), autocast_dtype
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)

    @property
    def device(self) -> torch.device:
        emb = self.root.get_input_embeddings() if hasattr(self.root, "get_input_embeddings") else None
        return (placement.device_of(emb) if emb is not None else None) or super().device

    def encode(self, texts: Sequence[str], what: str = "sentences") -> list[list[int]]:
        texts = check_texts(texts, what)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)[
            "input_ids"
        ]
        empty = [i for i, x in enumerate(ids) if len(x) == 0]
        if empty:
            shown = ", ".join(f"{what}[{i}] = {texts[i][:40]!r}" for i in empty[:3])
            more = ", ..." if len(empty) > 3 else ""
            raise ArgumentError(
                f"{len(empty)} of the {what} tokenize to zero tokens ({shown}{more}): "
                f"a sentence without tokens has no activations to pool; remove it or check the tokenizer",
                what,
            )
        return [list(x) for x in ids]

    def count(self, encoded) -> int:
        return len(encoded)

    def prepare(self, encoded, names: Sequence[str]) -> None:
        if self.packing is None and self._mask_kind() is not None and len(encoded):
            self.packing = self._packing_agrees(encoded, names)

    def _packing_agrees(self, encoded, names: Sequence[str]) -> bool:
        """Two sentences read packed in one row give (within float tolerance) the pooled
        activations they give read apart; a packed forward that raises is a no."""
        probe = [0, 1] if len(encoded) > 1 else [0, 0]
        try:
            with torch.no_grad():
                self.packing = False
                apart = self.pooled(encoded, names, probe)
                self.packing, self._capacity = True, sum(len(encoded[i]) for i in probe)
                if not self._can_pack([self._capacity]):
                    return False  # two sentences longer than a sliding window: no probe
                try:
                    packed = self.pooled(encoded, names, probe)
                except Exception:  # e.g. no position_ids argument, a mask it refuses
                    return False
        finally:
            self.packing, self._capacity = None, None
        tol = 1e-3 if self.autocast_dtype is None else 5e-2
        return all(
            bool(((packed[n] - apart[n]).abs().max() <= tol * apart[n].abs().max() + 1e-6).item())
            for n in names
        )

    def _mask_kind(self) -> str | None:
        """ "bool" (sdpa) or "additive" (eager): the 4-D mask the model's attention takes."""
        impl = getattr(getattr(self.root, "config", None), "_attn_implementation", None)
        return {"sdpa": "bool", "eager": "additive"}.get(impl)

    def _can_pack(self, lengths) -> bool:
        window = getattr(getattr(self.root, "config", None), "sliding_window", None)
        return (
            self._mask_kind() is not None
            and bool(lengths)
            and (not isinstance(window, int) or max(lengths) <= window)
        )

    def batches(self, encoded, idx):
        if self.packing and self._can_pack([len(encoded[i]) for i in idx]):
            yield from self._packed_batches(encoded, idx)
        else:
            yield from self._bucketed_batches(encoded, idx)

    def _packed_batches(self, encoded, idx):
        lengths = [len(encoded[i]) for i in idx]
        rows = pack_rows(lengths, self._capacity)
        fill = [sum(lengths[k] for k in r) for r in rows]
        start = 0
        while start < len(rows):  # rows to forwards of ≤ MAX_TOKENS tokens
            stop, width, count = start + 1, fill[start], len(rows[start])
            while (
                stop < len(rows)
                and (stop + 1 - start) * max(width, fill[stop]) <= self.MAX_TOKENS
                and count + len(rows[stop]) <= self.MAX_SENTENCES
            ):
                width, count = max(width, fill[stop]), count + len(rows[stop])
                stop += 1
            yield self._packed_batch(encoded, idx, lengths, rows[start:stop], width)
            start = stop

    def _packed_batch(self, encoded, idx, lengths, rows, width):
        """One forward's (positions, run, pool): ids, position_ids restarting at each sentence,
        the (R, 1, L, L) block-diagonal causal mask, and the pooling matrix."""
        R = len(rows)
        ids = torch.full((R, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((R, width), dtype=torch.long)
        seg = torch.zeros((R, width), dtype=torch.long)  # which sentence each token is in
        spans = {}  # position in idx -> (start, length)
        for r, row in enumerate(rows):
            off = 0
            for j, k in enumerate(row):
                n = lengths[k]
                ids[r, off : off + n] = torch.tensor(encoded[idx[k]], dtype=torch.long)
                pos[r, off : off + n] = torch.arange(n)
                seg[r, off : off + n] = j
                spans[k] = (r * width + off, n)
                off += n
            # the tail: one more "sentence" of its own (every query sees at least itself: no
            # all-masked row, no NaN), of a real token rather than the pad token
            ids[r, off:] = ids[r, 0]
            pos[r, off:] = torch.arange(width - off)
            seg[r, off:] = len(row)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (R, L, L): True = attend
        dev = self.device
        if self._mask_kind() == "additive":
            dtype = next((p.dtype for p in self.root.parameters() if p.is_floating_point()), torch.float32)
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        mask = mask[:, None].to(dev)
        positions = sorted(spans)
        weights = segment_means(
            [spans[k][0] for k in positions], [spans[k][1] for k in positions], R * width, dev
        )
        ids, pos = ids.to(dev), pos.to(dev)

        def pool(h, weights=weights):
            with torch.autocast(h.device.type, enabled=False):
                return weights @ h.reshape(weights.shape[1], -1).float()

        return (
            positions,
            lambda: self.root(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False),
            pool,
        )

    def _bucketed_batches(self, encoded, idx):
        for bucket in length_buckets([len(encoded[i]) for i in idx]):
            ids, mask = pad_right([encoded[idx[b]] for b in bucket], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            yield (
                bucket,
                lambda ids=ids, mask=mask: self.root(input_ids=ids, attention_mask=mask, use_cache=False),
                lambda h, mask=mask: masked_mean(h, mask),
            )


def pipeline_view(pipeline) -> nn.Module:
    """An nn.Module view of a diffusers pipeline: its nn.Module components, by name."""
    view = nn.ModuleDict({k: v for k, v in pipeline.components.items() if isinstance(v, nn.Module)})
    view.config = getattr(pipeline.unet, "config", None)
    return view


class PipelineTarget(Target):
    """A text-to-image diffusers pipeline built on UNet2DConditionModel (SD, SDXL).

    Prompts go through the pipeline's own text encoder(s) once; each sample is one image: the
    UNet runs once at ``timestep`` on noise, and each module's output is averaged over H×W
    (token-shaped outputs of the UNet's transformer blocks over tokens). Reading runs without
    classifier-free guidance, so every sample is conditional. ``encode`` gives prompt k the
    k-th row of a noise draw seeded with ``seed`` (the same rows for every prompt set).

    Common random numbers (``shared_noise=True``, the default): the UNet's activations depend
    on the noise as much as on the prompt (before the first cross-attention only on the noise),
    so a loss between source and target samples on different noise rewards maps that move the
    noise. Training therefore draws, every step, one fresh noise tensor from the trainer's
    seeded generator (a resumed run draws the same) and runs sample i of the step's source
    batch and sample i of its target batch on the same noise ``noise[i]``; the target
    activations are read again under that noise each step (no grad, maps off), so the loss sees
    only what the prompts change. ``shared_noise=False``: the former behaviour, the target read
    once on the fixed noise of ``encode`` and the source batch on its own rows of it.

    Args:
        timestep: the denoising timestep at which activations are read (default: the first
            sampling step, the scheduler's largest training timestep; pass the one-step model's
            timestep for DMD2-style distillations).
        seed: seeds the noise of ``encode``. resolution: latent height/width (default: the
        UNet's ``sample_size``). batch_size: prompts per UNet call. shared_noise: see above.
    """

    kind = "pipeline"

    def __init__(
        self,
        pipeline,
        timestep: int | None = None,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        shared_noise: bool = True,
    ):
        if shared_noise not in (True, False):
            raise TypeError(f"shared_noise must be True or False, got {shared_noise!r}")
        super().__init__(pipeline, pipeline_view(pipeline))
        self.shared_noise = bool(shared_noise)
        self.pipe, self.unet = pipeline, pipeline.unet
        sched = pipeline.scheduler
        self.timestep = int(timestep if timestep is not None else sched.config.num_train_timesteps - 1)
        if not 0 <= self.timestep < sched.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {sched.config.num_train_timesteps}), got {timestep}")
        self.seed, self.batch_size = seed, batch_size
        self.res = resolution or self.unet.config.sample_size
        self.autocast_dtype = autocast_dtype
        # a private scheduler whose timesteps include ours, for scale_model_input (the
        # pipeline's own scheduler state is left alone)
        self.sched = copy.deepcopy(sched)
        try:
            self.sched.set_timesteps(sched.config.num_train_timesteps)
        except (TypeError, ValueError):
            pass

    @property
    def device(self) -> torch.device:
        return placement.input_device(self.unet) or torch.device("cpu")

    def require(self, names, what="modules"):
        outside = [n for n in names if not n.startswith("unet.")]
        if outside:
            raise ValueError(f"diffusion steering reads UNet modules only (unet.*); got {outside[:5]}")
        super().require(names, what)

    def encode(self, prompts: Sequence[str], what: str = "source") -> dict:
        prompts = check_texts(prompts, f"{what} prompts")
        with torch.no_grad():
            out = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        enc = {"prompt_embeds": out[0], "n": len(prompts)}
        if len(out) == 4 and out[2] is not None:  # SDXL: pooled embeds + time ids
            enc["text_embeds"] = out[2]
            proj = getattr(self.pipe.text_encoder_2, "config", None)
            size = self.res * self.pipe.vae_scale_factor
            ids = self.pipe._get_add_time_ids(
                (size, size),
                (0, 0),
                (size, size),
                dtype=out[0].dtype,
                text_encoder_projection_dim=getattr(proj, "projection_dim", None),
            )
            enc["time_ids"] = ids.to(self.device).repeat(len(prompts), 1)
        enc["noise"] = self.draw_noise(len(prompts), torch.Generator().manual_seed(self.seed))
        return enc

    def count(self, encoded) -> int:
        return encoded["n"]

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, in_channels, res, res) standard normal latents drawn on the CPU from
        ``generator`` (the same values on every device), on the UNet's device and dtype (to a
        GPU from pinned memory, so the copy does not wait for the work queued before it)."""
        shape = (integer(n, "n", low=1), self.unet.config.in_channels, self.res, self.res)
        noise, dev = torch.randn(shape, generator=generator), self.device
        if dev.type == "cuda":
            noise = noise.pin_memory()
        return noise.to(dev, self.unet.dtype, non_blocking=True)

    def with_noise(self, encoded: dict, idx: Sequence[int], noise: torch.Tensor) -> dict:
        """The prompts ``idx`` of ``encoded`` (repeats allowed) as an encoded set whose sample
        i is prompt idx[i] on ``noise[i]``; ``noise`` (len(idx), in_channels, res, res)."""
        idx = list(idx)
        shape = (len(idx), self.unet.config.in_channels, self.res, self.res)
        if tuple(noise.shape) != shape:
            raise ValueError(
                f"noise for {len(idx)} samples must have shape {shape}, got {tuple(noise.shape)}"
            )
        out = {k: encoded[k][idx] for k in ("prompt_embeds", "text_embeds", "time_ids") if k in encoded}
        out.update(noise=noise, n=len(idx))
        return out

    def _unet_kwargs(self, enc: dict, idx: list) -> dict:
        # the first sampling step's input: pure noise at the scheduler's initial scale
        latents = enc["noise"][idx] * getattr(self.sched, "init_noise_sigma", 1.0)
        try:
            latents = self.sched.scale_model_input(latents, self.timestep)
        except (AttributeError, IndexError, ValueError, RuntimeError):
            pass  # schedulers without input scaling
        kw = {
            "sample": latents,
            "timestep": self.timestep,
            "encoder_hidden_states": enc["prompt_embeds"][idx],
        }
        if "text_embeds" in enc:
            kw["added_cond_kwargs"] = {
                "text_embeds": enc["text_embeds"][idx],
                "time_ids": enc["time_ids"][idx],
            }
        return kw

    def batches(self, encoded, idx):
        for i in range(0, len(idx), self.batch_size):
            chunk = idx[i : i + self.batch_size]
            yield (
                list(range(i, i + len(chunk))),
                lambda chunk=chunk: self.unet(**self._unet_kwargs(encoded, chunk)),
                pool_image,
            )


def as_target(
    obj,
    tokenizer=None,
    *,
    max_length: int = 128,
    autocast_dtype: torch.dtype | None = None,
    timestep: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
) -> Target:
    """The ``Target`` for a model (with its tokenizer to read activations), a diffusers pipeline
    (``tokenizer`` None), or a ``Target`` (returned as it is)."""
    if isinstance(obj, Target):
        return obj
    if is_pipeline(obj):
        return PipelineTarget(obj, timestep, seed, resolution, autocast_dtype=autocast_dtype)
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module, a diffusers pipeline or a lineas_fast "
            f"Target, got {type(obj).__name__}"
        )
    if tokenizer is None:
        return Target(obj, obj)
    return LanguageModelTarget(obj, tokenizer, max_length, autocast_dtype)
