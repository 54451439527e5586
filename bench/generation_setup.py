"""Generation throughput of a steered model, five ways:

* ``unsteered``: the plain model;
* ``reference_hooks``: plain PyTorch forward hooks computing z + λ((ω−1)z + b) (research-code style);
* ``lineas_hooks``: ``Steering.attach`` (the fused ``affine_steer`` kernel on CUDA);
* ``lineas_gated``: the same maps with DSAS gates (the fused gated kernel on CUDA);
* ``fused_norms``: ``lf.fuse_in_memory`` (map inside the norm; no extra op);
* ``folded``: ``lf.fuse`` (weights and biases changed; the plain graph).
Prefill tokens/s is B·T / time of one forward over the prompt; decode tokens/s is B·N / (time of
``generate`` with N new tokens − prefill time): ``lineas_fast.serve.bench.throughput``, the measurement
of ``lineas-fast bench``, which times unsteered / hooks / fused_norms / folded itself;
``extra_providers`` adds the two this repo's benchmark also compares (reference hooks, DSAS gates).
"""

from __future__ import annotations

import copy
import re

import torch

import lineas_fast as lf
from lineas_fast.serve.bench import throughput  # noqa: F401 -- the measurement, re-exported

PROVIDERS = ["unsteered", "reference_hooks", "lineas_hooks", "lineas_gated", "fused_norms", "folded"]
PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"

QWEN25 = {
    "1.5B": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7B": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


def random_steering(model, pattern=PATTERN, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    return lf.Steering(
        {n: (1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)) for n in names}
    )


def prepare(provider, model, steering, strength=1.0):
    """(model to run, handle to remove or None)."""
    dev = next(model.parameters()).device
    st = steering.to(dev)
    if provider == "unsteered":
        return model, None
    if provider == "reference_hooks":
        mods = dict(model.named_modules())
        hs = [
            mods[n].register_forward_hook(
                lambda m, a, out, om=st[n][0], b=st[n][1]: out + strength * ((om - 1) * out + b).to(out.dtype)
            )
            for n in st.modules
        ]
        return model, _Handles(hs)
    if provider == "lineas_hooks":
        return model, st.attach(model, strength=strength, strict=False)
    if provider == "lineas_gated":
        g = torch.Generator().manual_seed(1)
        gates = {
            n: {
                "w": (torch.randn(st[n][0].shape[0], generator=g) * 0.01).to(dev),
                "c": torch.zeros(1, device=dev),
                "kind": "sigmoid",
            }
            for n in st.modules
        }
        gated = lf.Steering({n: st[n] for n in st.modules}, gates=gates)
        return model, gated.attach(model, strength=strength, strict=False)
    if provider == "fused_norms":
        return lf.fuse_in_memory(copy.deepcopy(model), st, strength), None
    if provider == "folded":
        return lf.fuse(copy.deepcopy(model), st, strength), None
    raise ValueError(provider)


class _Handles:
    def __init__(self, hs):
        self.hs = hs

    def remove(self):
        for h in self.hs:
            h.remove()


def extra_providers(model, steering, strength=1.0) -> dict:
    """{name: prepare() -> (model to run, cleanup)} for ``lineas_fast.serve.bench.measure``: the
    research-code-style hooks and the DSAS-gated lineas_fast hooks."""

    def make(provider):
        def prepare_it():
            run, handle = prepare(provider, model, steering, strength)
            return run, (handle.remove if handle else (lambda: None))

        return prepare_it

    return {p: make(p) for p in ("reference_hooks", "lineas_gated")}


@torch.no_grad()
def ops_per_forward(model, batch=1, prompt_len=16, seed=0) -> int:
    """ATen operator calls in one forward pass (deterministic, unlike CPU timings): a folded
    model must match the unsteered count exactly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).to(dev)
    with Count():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return Count.n
