"""What the vLLM tests of the serving lane (tests/serving) and of the gpu lane
(tests/gpu/test_vllm_v2_engine.py) build alike: a tiny random Llama that vLLM's attention
supports, a set of three steerings on it, and the transformers continuations a per-request
steered engine must return. No vLLM import here."""

from __future__ import annotations

import torch

import lineas_fast as lf

NEW_TOKENS = 24
#: the steerable norms of ``tiny_llama`` (2 layers)
NORMS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]


@torch.no_grad()
def greedy_hf(model, prompt_ids, new_tokens=NEW_TOKENS):
    """Greedy continuations (token ids) of each prompt, one prompt at a time (no padding)."""
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        y = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        outs.append(y[0, x.shape[1] :].tolist())
    return outs


def tiny_llama(hidden: int = 128, heads: int = 2, kv_heads: int = 1):
    """A small random 2-layer Llama whose shapes vLLM's CPU attention supports (head_dim 64 with
    the defaults) and whose logits are peaked enough (init std 0.1) that greedy decoding has no
    near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def steered_greedy(model, steerings: dict, prompt, spec, new_tokens: int) -> list:
    """``greedy_hf`` of one prompt with the hooks of ``steerings[spec[0]]`` at strength
    ``spec[1]`` (spec None: unsteered): what a per-request steered engine must return."""
    if spec is None:
        return greedy_hf(model, [prompt], new_tokens)[0]
    with steerings[spec[0]].apply(model, strength=spec[1]):
        return greedy_hf(model, [prompt], new_tokens)[0]


def three_steerings(model, hidden: int) -> dict[str, lf.Steering]:
    """Three steerings of ``tiny_llama(hidden)`` on different norms (the final norm included):
    ``all`` (every norm), ``first`` (layer 0's input norm and the final norm) and ``gated``
    (two norms, a DSAS gate on one); ω = 1 + 0.3·N(0, 1), b = 0.5·N(0, 1), seed 11."""
    g = torch.Generator().manual_seed(11)
    meta = {"model": lf.model_fingerprint(model)}

    def maps(modules):
        return {
            m: (1 + 0.3 * torch.randn(hidden, generator=g), 0.5 * torch.randn(hidden, generator=g))
            for m in modules
        }

    gate = {
        "w": 2 * torch.randn(hidden, generator=g) / hidden**0.5,
        "c": torch.tensor([0.3]),
        "kind": "sigmoid",
    }
    return {
        "all": lf.Steering(maps(NORMS + ["model.norm"]), metadata=meta),
        "first": lf.Steering(maps(["model.layers.0.input_layernorm", "model.norm"]), metadata=meta),
        "gated": lf.Steering(
            maps(["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm"]),
            metadata=meta,
            gates={"model.layers.0.post_attention_layernorm": gate},
        ),
    }
