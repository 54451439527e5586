"""Per-request steering under vLLM's V2 model runner (``vllm.v1.worker.gpu``; the interface of
vLLM 0.32.0). No vLLM import at module level; ``vllm_plugin`` connects this to vLLM.

The V2 runner keeps each request in a persistent *slot* from its arrival to its end (slots come
from a free list; a freed slot is reused by a later request), and rebuilds the batch order every
step: ``idx_mapping`` (num_reqs,) int64 maps each batch position to its request's slot. The
forward sees only ``query_start_loc``, which indexes batch positions, so the op's row tables
(``slots.RowTables``: row_slot (R + 1,), row_lam (R + 1,), one row per batch position) are
filled per step from per-slot tables:

    slot_tables.slot (N,) int64, slot_tables.lam (N,) float32     N = the runner's max_num_reqs
    row_slot[:n] = slot_tables.slot[idx_mapping],  row_lam[:n] = slot_tables.lam[idx_mapping]

a device gather into the existing tensors (fixed addresses, so graphs captured on them stay
valid; no host sync), run by ``gather_rows`` after ``GPUModelRunner.prepare_inputs`` builds the
step's ``idx_mapping`` and before the forward. The logits processor fills the per-slot tables:
``add_request(req_idx, params)`` stages a slot's steering on the host (every slot is fully
rewritten when a request takes it, so a reused slot keeps nothing of its last occupant),
``apply_staged_writes()`` (called by the runner every step before the batch is built) copies
the staged slots to the device.

vLLM extension points relied on (0.32.0; ``interface_mismatch`` names any that differ):

* ``vllm.v1.worker.gpu.sample.logits_processor.interface``: ``LogitsProcessor`` with
  ``__init__(vllm_config, req_states)``, ``add_request(req_idx, sampling_params) -> bool``,
  ``apply_staged_writes()``, ``apply(logits, ctx)``; ``LogitsProcRequestState`` (``device``,
  ``max_num_reqs``); ``LogitsContext`` (``idx_mapping_np``, ``expanded_idx_mapping``);
* ``vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs`` (wrapped once per process,
  by ``install``) returning an ``InputBatch`` with ``num_reqs`` and ``idx_mapping``; vLLM's
  CPU V2 runner subclasses it without overriding the method.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from lineas_fast.serve.registry import slot_of
from lineas_fast.serve.slots import RowTables

#: the signatures this module is written for (vLLM 0.32.0's V2 logits-processor interface)
EXPECTED = {
    "__init__": ["self", "vllm_config", "req_states"],
    "add_request": ["self", "req_idx", "sampling_params"],
    "apply_staged_writes": ["self"],
    "apply": ["self", "logits", "ctx"],
}


class SlotTables:
    """Each persistent request slot's steering slot and strength on the device (``slot`` (N,)
    int64, ``lam`` (N,) float32; slot 0 / strength 0: unsteered), written from host-staged
    entries by ``apply_staged_writes``."""

    def __init__(self, num_slots: int, device):
        self.num_slots = num_slots
        self.slot = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.lam = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.staged: dict[int, tuple[int, float]] = {}

    def stage(self, req_idx: int, choice: tuple[str, float] | None) -> None:
        """The request now in slot ``req_idx`` asks for ``choice`` (steering name, strength;
        None: no steering), written to the device by the next ``apply_staged_writes``."""
        if not 0 <= req_idx < self.num_slots:
            raise IndexError(f"lineas_fast: request slot {req_idx} outside the runner's {self.num_slots}")
        self.staged[req_idx] = (0, 0.0) if choice is None else (slot_of(choice[0], choice[1]), abs(choice[1]))

    def apply_staged_writes(self) -> None:
        """Copy the staged slots to the device (fresh host tensors each time: a copy still in
        flight never reads a host buffer rewritten by a later step)."""
        if not self.staged:
            return
        idx = torch.tensor(list(self.staged), dtype=torch.int64)
        slot = torch.tensor([s for s, _ in self.staged.values()], dtype=torch.int64)
        lam = torch.tensor([lm for _, lm in self.staged.values()], dtype=torch.float32)
        self.staged.clear()
        device = self.slot.device
        idx = idx.to(device)
        self.slot.index_copy_(0, idx, slot.to(device))
        self.lam.index_copy_(0, idx, lam.to(device))


def gather_rows(tables: SlotTables, rows: RowTables, idx_mapping: Tensor, num_reqs: int) -> None:
    """Rows ``0 .. num_reqs - 1`` of ``rows`` (batch positions) take the steering of the slot
    ``idx_mapping`` (>= num_reqs,) int64 names for each, in place (rows past ``num_reqs`` keep
    old values: no token of the step maps to them, ``slots.rows_of_tokens``)."""
    idx = idx_mapping[:num_reqs]
    torch.index_select(tables.slot, 0, idx, out=rows.slot[:num_reqs])
    torch.index_select(tables.lam, 0, idx, out=rows.lam[:num_reqs])


#: (SlotTables, RowTables) of this process's engine, read by the wrapped ``prepare_inputs``
_active: tuple[SlotTables, RowTables] | None = None


def activate(tables: SlotTables, rows: RowTables) -> None:
    """Make ``tables`` and ``rows`` the ones each step fills (``install`` the hook first)."""
    global _active
    _active = (tables, rows)


def deactivate() -> None:
    global _active
    _active = None


def after_prepare_inputs(input_batch) -> None:
    """The hook's body: the step's batch-position rows from its ``idx_mapping``."""
    if _active is not None:
        gather_rows(*_active, input_batch.idx_mapping, input_batch.num_reqs)


def install() -> None:
    """Wrap ``GPUModelRunner.prepare_inputs`` (once per process) so each step's row tables are
    gathered right after the runner builds the step's batch."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    prepare = GPUModelRunner.prepare_inputs
    if getattr(prepare, "_lineas_fast_rows", False):
        return

    @functools.wraps(prepare)
    def prepare_inputs(self, *args, **kwargs):
        input_batch = prepare_inputs.__wrapped__(self, *args, **kwargs)  # vLLM's (functools.wraps)
        after_prepare_inputs(input_batch)
        return input_batch

    prepare_inputs._lineas_fast_rows = True
    GPUModelRunner.prepare_inputs = prepare_inputs


def _params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def interface_mismatch() -> str | None:
    """None when this vLLM's V2 runner has the interface this module is written for (0.32.0's),
    else what differs, in words."""
    import dataclasses

    try:
        from vllm.v1.worker.gpu.input_batch import InputBatch
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
        from vllm.v1.worker.gpu.sample.logits_processor import interface
    except ImportError as e:
        return f"the V2 model runner's modules do not import ({e})"
    missing = []
    for name, want in EXPECTED.items():
        got = _params(getattr(interface.LogitsProcessor, name, None))
        if got != want:
            missing.append(f"LogitsProcessor.{name}({', '.join(got[1:])}) is not ({', '.join(want[1:])})")
    if hasattr(interface.LogitsProcessor, "remove_request"):
        missing.append("LogitsProcessor has remove_request (0.32's re-initializes a slot in add_request)")
    for cls, fields in (
        (getattr(interface, "LogitsProcRequestState", None), {"device", "max_num_reqs"}),
        (getattr(interface, "LogitsContext", None), {"idx_mapping_np", "expanded_idx_mapping"}),
        (InputBatch, {"num_reqs", "idx_mapping"}),
    ):
        have = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if not fields <= have:
            what = getattr(cls, "__name__", "LogitsProcRequestState / LogitsContext")
            missing.append(f"{what} lacks {sorted(fields - have)}")
    if not callable(getattr(GPUModelRunner, "prepare_inputs", None)):
        missing.append("GPUModelRunner.prepare_inputs is gone")
    return "; ".join(missing) or None
