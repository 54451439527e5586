"""GPU lane: per-request steering in a vLLM engine on vLLM's V2 model runner (vLLM's default on
GPUs), end to end: vLLM's scheduler, its persistent request slots (reused as requests finish),
its batch reordering, chunked prefill, and, in the default mode, torch.compile with CUDA graphs
captured on the plugin's row tables. Every request of a mixed batch (three steerings, one
DSAS-gated, strengths of both signs, none) continues token for token as transformers with that
steering's hooks (greedy, fp32). A request naming an unknown steering is refused by vLLM's V2
front end. Needs CUDA and a CUDA build of vLLM 0.32 (the lane's environment does not install
vLLM: the module is skipped there without it); the CPU half of this check, vLLM's V2 classes
driven step by step, is tests/serving/test_vllm_v2.py."""

import gc

import pytest
import torch
from vllm_cases import steered_greedy, three_steerings, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
vllm = pytest.importorskip("vllm", reason="needs a CUDA build of vLLM 0.32 in this environment")
pytest.importorskip(
    "vllm.v1.worker.gpu.sample.logits_processor.interface", reason="a vLLM with the V2 runner"
)

HIDDEN = 128
SPECS = [("all", 1.0), None, ("first", -0.7), ("gated", 1.5), ("all", 0.25), ("gated", -0.8), ("first", 2.0)]
NEW_TOKENS = 12


def params(spec, new_tokens=NEW_TOKENS):
    from vllm import SamplingParams

    extra = None if spec is None else {"lineas_fast": {"steering": spec[0], "strength": spec[1]}}
    return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)


@pytest.mark.parametrize("mode", ["cuda-graphs", "eager"])
def test_v2_runner_mixed_batches_token_exact(mode, tmp_path, monkeypatch):
    from vllm import LLM

    from lineas_fast.serve import vllm_plugin

    model = tiny_llama(HIDDEN)
    model.save_pretrained(tmp_path / "tiny-llama", safe_serialization=True)
    steerings = three_steerings(model, HIDDEN)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    vllm_plugin.clear_steerings()
    for name, steering in steerings.items():
        vllm_plugin.register_steering(name, steering)
    llm = None
    try:
        llm = LLM(
            model=str(tmp_path / "tiny-llama"),
            dtype="float32",
            max_model_len=128,
            max_num_seqs=8,
            max_num_batched_tokens=64,  # prompts of up to 60 tokens: chunked prefill
            enforce_eager=mode == "eager",
            seed=0,
            skip_tokenizer_init=True,
            gpu_memory_utilization=0.3,
        )
        assert llm.llm_engine.vllm_config.use_v2_model_runner, "the engine is not on the V2 model runner"
        g = torch.Generator().manual_seed(7)
        # 28 requests through 8 slots: requests finish and their slots are reused; a batch of
        # mixed steerings each step, reordered by vLLM (prefills and decodes)
        prompts = [
            torch.randint(3, 512, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 60, (28,), generator=g)
        ]
        specs = [SPECS[k % len(SPECS)] for k in range(len(prompts))]
        lengths = [NEW_TOKENS - (k % 5) for k in range(len(prompts))]
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [params(s, n) for s, n in zip(specs, lengths)],
            use_tqdm=False,
        )
        for k, (p, s, n, o) in enumerate(zip(prompts, specs, lengths, outs)):
            want = steered_greedy(model, steerings, p, s, n)
            assert list(o.outputs[0].token_ids) == want, (
                f"request {k} ({s}): vLLM {o.outputs[0].token_ids} != {want}"
            )
        plain = [steered_greedy(model, steerings, p, None, n) for p, n in zip(prompts[:7], lengths[:7])]
        assert all(list(outs[k].outputs[0].token_ids) != plain[k] for k in (0, 2, 3, 4, 5, 6)), (
            "steerings must act"
        )
        # a request the V2 front end refuses (validate_params), the engine serving on
        with pytest.raises(Exception, match="unknown steering"):
            llm.generate([{"prompt_token_ids": prompts[0]}], params(("nope", 1.0)), use_tqdm=False)
        again = llm.generate([{"prompt_token_ids": prompts[3]}], params(specs[3], lengths[3]), use_tqdm=False)
        assert list(again[0].outputs[0].token_ids) == list(outs[3].outputs[0].token_ids)
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        vllm_plugin.clear_steerings()
