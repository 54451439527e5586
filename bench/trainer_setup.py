"""A SmolLM2-135M-sized Llama with random weights, a word-level tokenizer over its vocabulary,
synthetic sentences of realistic, varied lengths, and the reference-style trainer that the
published code uses (forward hooks, full forward with LM head, model weights not frozen,
per-layer torch.sort loss, targets computed once)."""
from __future__ import annotations

import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    pad_token_id=0, eos_token_id=1)


def smollm2_sized(layers: int = 30, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer(vocab_size: int = 49152) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def sentences(count: int, seed: int, lo: int = 6, hi: int = 48, vocab: int = 49152) -> list[str]:
    """Word counts uniform in [lo, hi], like 20–200-character comments."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (k,), generator=g)))
    return out


def reference_trainer_step_times(model, tok, source, target, pattern, steps, lr=0.1):
    """The published recipe, step by step; returns per-step seconds (targets excluded)."""
    import re
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    mods = dict(model.named_modules())
    d = model.config.hidden_size
    params = {n: (torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True))
              for n in names}
    store, mask_box = {}, {}

    def hook(name, steer):
        def f(_m, _a, out):
            if steer:
                om, b = params[name]
                out = out * om + b
            m = mask_box["mask"].unsqueeze(-1).to(out.dtype)
            store[name] = (out * m).sum(1) / m.sum(1)
            return out
        return f

    def run(texts, steer):
        enc = tok(texts, return_tensors="pt", padding=True)
        mask_box["mask"] = enc["attention_mask"]
        hs = [mods[n].register_forward_hook(hook(n, steer)) for n in names]
        try:
            model(**enc)                                         # full forward, LM head included
        finally:
            for h in hs:
                h.remove()
        return [store[n] for n in names]

    with torch.no_grad():
        ys = [y.sort(0).values for y in run(target, steer=False)]
    opt = torch.optim.SGD([t for p in params.values() for t in p], lr=lr)
    for p in model.parameters():
        p.requires_grad_(True)                                   # weights not frozen
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        xs = run(source, steer=True)
        loss = sum(((x.sort(0).values - y) ** 2).sum(0).mean() for x, y in zip(xs, ys)) / len(xs)
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def lineas_step_times(model, tok, source, target, pattern, steps, **kw):
    """Per-step seconds of ``lf.train`` (from its callback; target profiles excluded)."""
    import lineas_fast as lf
    stamps = []

    def cb(_rec):
        stamps.append(time.perf_counter())
    # the first callback marks the end of step 0; time steps 1.. from consecutive stamps
    lf.train(model, tok, source, target, modules=pattern, steps=steps + 1, batch_size=len(source),
             progress=False, callback=cb, **kw)
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])]
