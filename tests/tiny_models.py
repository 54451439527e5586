"""Tiny random causal LMs of each supported family and an offline character tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHARS = [chr(c) for c in range(32, 127)]


def tiny_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    fast.padding_side = padding_side
    return fast


VOCAB = 4 + len(CHARS)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=3,
)

FAMILIES = {
    "llama": dict(model_type="llama", **COMMON),
    "qwen2": dict(model_type="qwen2", **COMMON),
    "mistral": dict(model_type="mistral", sliding_window=None, **COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=8, **COMMON),
    "gemma3": dict(model_type="gemma3_text", head_dim=8, sliding_window=16, **COMMON),
    "gemma": dict(model_type="gemma", head_dim=8, **COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=8, **COMMON),
    "phi3": dict(model_type="phi3", sliding_window=None, **COMMON),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    ),
}

# modules whose output is a steerable normalized stream, per family
NORMS = {
    "llama": r"model\.layers\.\d+\.post_attention_layernorm",
    "qwen2": r"model\.layers\.\d+\.post_attention_layernorm",
    "mistral": r"model\.layers\.\d+\.post_attention_layernorm",
    "gemma2": r"model\.layers\.\d+\.pre_feedforward_layernorm",
    "gemma3": r"model\.layers\.\d+\.pre_feedforward_layernorm",
    "gemma": r"model\.layers\.\d+\.post_attention_layernorm",
    "qwen3": r"model\.layers\.\d+\.post_attention_layernorm",
    "phi3": r"model\.layers\.\d+\.post_attention_layernorm",
    "gpt2": r"transformer\.h\.\d+\.ln_2",
}


def tiny_model(family: str, seed: int = 0):
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.eval()
    return model


SOURCE = [
    "you are a rotten fool",
    "what a stupid idea that was",
    "go away you clown",
    "nobody likes your dumb jokes",
    "shut up already",
    "that is idiotic and lazy",
    "your work is garbage",
    "you never learn anything",
]
TARGET = [
    "thank you for the help",
    "what a lovely idea that was",
    "please come again soon",
    "everyone enjoys your stories",
    "the weather is nice today",
    "that is clever and kind",
    "your work is careful",
    "you always learn something new",
    "have a great evening",
]
