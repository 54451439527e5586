"""Run by tests/serving/test_vllm_v2.py in a subprocess (``python v2_runner_steps.py MODEL_DIR``,
steerings registered through $LINEAS_FAST_STEERINGS): the plugin driven through vLLM's own V2
model-runner classes for three engine steps, as ``GPUModelRunner.execute_model`` drives them
(vLLM 0.32.0), each step's tokens checked against transformers with that request's steering
hooks. vLLM's V2 runner needs Triton kernels to run an engine, which this CPU has not; every
step here uses vLLM's classes up to the kernels:

* ``RequestState`` (the persistent request slots, handed out from vLLM's free list; a finished
  request's slot is reused by the next one) wrapped as ``LogitsProcRequestState``;
* the plugin's processor built by ``build_custom_logits_processors`` (the V2 loader, from the
  ``vllm.logits_processors`` entry point, as ``GPUModelRunner.load_model`` builds it);
  ``add_request(req_idx, params)`` per joining request and ``apply_staged_writes()`` per step,
  as ``GPUModelRunner.add_requests`` and the sampler call them;
* the step's ``InputBatch`` from ``InputBatch.make_dummy`` (vLLM's own ``query_start_loc`` in the
  persistent ``InputBuffers``) with the batch order permuted as ``gather_batch_req_state`` sorts
  it (``idx_mapping``: batch position -> slot), passed through ``GPUModelRunner.prepare_inputs``
  as the plugin wraps it (the original's Triton kernels stubbed out: it returns that batch);
* the forward under a vLLM ``ForwardContext`` whose attention metadata carries that
  ``query_start_loc``, through the plugin's ``SlotSteered`` norms; tokens past the batch's last
  request are padding;
* ``apply(logits, LogitsContext)`` on the step's logits.

Prints one line per step and "v2 steps: ok" at the end; any mismatch raises."""

import dataclasses
import os
import sys
import types

import numpy as np
import torch
import vllm.v1.worker.cpu.shm  # noqa: F401  (vLLM's CPU stand-ins for torch.cuda, as its CPU worker imports them)
from transformers import AutoModelForCausalLM
from vllm.forward_context import ForwardContext, override_forward_context
from vllm.sampling_params import SamplingParams
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext
from vllm.v1.worker.gpu.states import RequestState

from lineas_fast.serve import registry, slots, vllm_plugin
from lineas_fast.serve.vllm_plugin import SlotSteered

SLOTS = 4  # the runner's max_num_reqs
TOL = dict(rtol=1e-4, atol=1e-4)  # a batched forward against one sequence at a time (fp32 matmuls)


def steer_norms(model, rows, max_tokens=64):
    """The plugin's ``SlotSteered`` on every module a registered steering names and its
    per-forward row lookup on the model (what ``vllm_plugin.steer_modules`` does to vLLM's
    model, here on transformers' with its LlamaRMSNorm)."""
    tokens = vllm_plugin.token_tables(max_tokens, "cpu")
    names = sorted({m for s in registry.registered().values() for m in s.modules})
    gated = slots.gated_modules()
    for name in names:
        mod = model.get_submodule(name)
        d = mod.weight.shape[0]
        u, b = slots.module_tables(name, d)
        gates = slots.gate_tables(name, d) if name in gated else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SlotSteered(mod, u, b, tokens, gates))
    vllm_plugin.look_up_rows_per_forward(model, rows, tokens)


def params(spec):
    extra = spec if isinstance(spec, dict) else None
    if isinstance(spec, tuple):
        extra = {"lineas_fast": {"steering": spec[0], "strength": spec[1]}}
    return SamplingParams(temperature=0.0, max_tokens=8, extra_args=extra)


class Runner:
    """What ``GPUModelRunner.execute_model`` does to the plugin per step, with vLLM's classes."""

    def __init__(self, folder):
        self.plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # the loader runs first in GPUModelRunner.load_model: row tables, wrapped norms
        self.rows = vllm_plugin.row_tables(SLOTS, "cpu")
        steer_norms(self.served, self.rows)
        cfg = self.plain.config
        self.req_states = RequestState(SLOTS, 64, 64, 0, cfg.vocab_size, torch.device("cpu"))
        vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=cfg))
        (self.proc,) = [
            p
            for p in build_custom_logits_processors(vllm_config, self.req_states, False)
            if type(p).__name__ == "SteeringLogitsProcessor"
        ]
        assert self.proc.v2 is not None, "the processor did not take the V2 path"
        self.buffers = InputBuffers(SLOTS, 64, torch.device("cpu"))
        self.specs = {}

    def finish(self, req_id):
        self.req_states.remove_request(req_id)
        del self.specs[req_id]

    def add(self, req_id, spec, prompt_len=4):
        self.req_states.add_request(req_id, prompt_len, list(range(3, 3 + prompt_len)), 0, 8)
        self.specs[req_id] = spec
        return self.proc.add_request(self.req_states.req_id_to_index[req_id], params(spec))

    def step(self, order, length, seed, padding=1):
        """One step: requests ``order`` (batch order) of ``length`` tokens each, then
        ``padding`` sequences of padding tokens; checks every token and the logits
        processor's ``apply``. Returns the batch's slots."""
        self.proc.apply_staged_writes()
        idx_np = np.array([self.req_states.req_id_to_index[r] for r in order], dtype=np.intp)
        n = len(order)
        batch = InputBatch.make_dummy(n, n * length, self.buffers)
        batch = dataclasses.replace(
            batch,
            req_ids=list(order),
            idx_mapping=torch.from_numpy(idx_np).to(torch.int64),
            idx_mapping_np=idx_np,
            expanded_idx_mapping=torch.from_numpy(idx_np).to(torch.int64),
        )
        wrapper = GPUModelRunner.prepare_inputs
        original = wrapper.__wrapped__
        wrapper.__wrapped__ = lambda runner, *args, **kwargs: batch  # its Triton kernels do not run here
        try:
            assert wrapper(None, None, None, None, 0) is batch
        finally:
            wrapper.__wrapped__ = original
        qsl = batch.query_start_loc
        assert qsl.data_ptr() == self.buffers.query_start_loc.data_ptr()
        assert qsl.tolist() == [k * length for k in range(n + 1)]
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, self.plain.config.vocab_size, (n + padding, length), generator=g)
        meta = {"model.layers.0.self_attn.attn": types.SimpleNamespace(query_start_loc=qsl)}
        context = ForwardContext(no_compile_layers={}, attn_metadata=meta, slot_mapping={})
        with torch.no_grad(), override_forward_context(context):
            got = self.served(input_ids=ids).logits
        steerings = registry.registered()
        with torch.no_grad():
            for k in range(n + padding):
                spec = self.specs[order[k]] if k < n else None
                if isinstance(spec, tuple):
                    with steerings[spec[0]].apply(self.plain, strength=spec[1]):
                        want = self.plain(input_ids=ids[k : k + 1]).logits[0]
                else:
                    want = self.plain(input_ids=ids[k : k + 1]).logits[0]
                torch.testing.assert_close(got[k], want, **TOL, msg=lambda m: f"position {k} {spec}: {m}")
                if isinstance(spec, tuple):  # the steering acts, far beyond the tolerance
                    plain = self.plain(input_ids=ids[k : k + 1]).logits[0]
                    assert (want - plain).abs().max() > 100 * TOL["atol"], f"position {k} {spec} not steered"
        # the logits processor: the last position's logits of each request
        logits = got[:n, -1].clone()
        ctx = LogitsContext(
            expanded_idx_mapping=batch.expanded_idx_mapping,
            idx_mapping=batch.idx_mapping,
            idx_mapping_np=idx_np,
            expanded_local_pos=batch.expanded_local_pos,
            input_ids=batch.input_ids,
            pos=batch.positions,
            seq_lens_upper_bound_np=np.zeros(n, dtype=np.int32),
        )
        out = self.proc.apply(logits.clone(), ctx)
        eos = self.plain.config.eos_token_id
        for k, r in enumerate(order):
            if isinstance(self.specs[r], dict):  # unservable here: only the end-of-sequence token
                assert int(out[k].argmax()) == eos and torch.isinf(out[k]).sum() == out.shape[1] - 1, r
            else:
                assert torch.equal(out[k], logits[k]), f"{r}: logits changed"
        print(f"step: order {order} slots {idx_np.tolist()} rows {self.rows.slot[:n].tolist()}", flush=True)
        return idx_np.tolist()


def main(folder):
    run = Runner(folder)
    # step 1: four requests (vLLM hands out slots 3, 2, 1, 0), batch order permuted
    assert run.add("a", ("all", 1.0)) is False
    assert run.add("b", None) is False
    assert run.add("c", ("first", -0.7)) is False
    assert run.add("d", ("gated", 1.5)) is False
    slots1 = run.step(["c", "a", "d", "b"], length=7, seed=1)
    assert slots1 == [1, 3, 0, 2], slots1
    # step 2: a and b finish; e takes b's slot (unsteered -> steered), f takes a's slot and
    # is a request this worker cannot serve (a steering its registry lacks): steered -> nothing
    run.finish("a")
    run.finish("b")
    assert run.add("e", ("all", 0.5)) is False
    unknown = {"lineas_fast": {"steering": "registered-elsewhere", "strength": 1.0}}
    assert run.add("f", unknown) is True  # vLLM then calls apply() for it, which ends it
    slots2 = run.step(["f", "d", "e", "c"], length=5, seed=2, padding=2)
    assert sorted(slots2) == [0, 1, 2, 3] and slots2[0] == 3 and slots2[2] == 2, slots2
    # step 3: f ends; g takes its slot, unsteered and served (not ended); decode-like (1 token)
    run.finish("f")
    assert run.add("g", None) is False
    slots3 = run.step(["e", "g", "c", "d"], length=1, seed=3)
    assert slots3[1] == 3 and not run.proc.failed, (slots3, run.proc.failed)
    # step 4: a smaller batch, its rows past the batch left as they were and never read
    run.finish("c")
    run.step(["d", "g"], length=3, seed=4, padding=2)
    print("v2 steps: ok")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
