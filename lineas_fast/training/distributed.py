"""Training across processes with torch.distributed: data parallel with the exact global loss,
and FSDP2 for a frozen model that does not fit one device.

A run under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) or inside an initialised process group gets a ``Ranks``; a single process gets
None and runs the single-process code unchanged. With N ranks:

* every rank draws the step's global batch of n sentence indices from the same seeded
  generator, and reads (forward, pooled activations) only its contiguous share of them:
  ``sizes(n)`` gives rank r ⌊n/N⌋ (+1 for the first n mod N ranks);
* ``gather`` joins the shares of every layer in one ``all_gather`` into the (n, d) rows of the
  global batch, in the batch's order, so the loss on every rank is the exact W2 of the global
  batch and the same number on every rank. Its backward returns this rank's rows of the
  incoming gradient, with no communication and no scaling: every rank computes the same loss
  from the same gathered rows, so ∂loss/∂(its own rows) is already complete on it
  (``torch.distributed.nn.functional.all_gather`` instead sums the gradient over the ranks in
  backward, N times the gradient here);
* a map's gradient on one rank is the sum over its own samples; ``reduce_grads`` sums them
  over the ranks (one ``all_reduce`` of one flat buffer), which is the single-process gradient,
  so every rank takes the same optimizer step and the maps stay identical (``check_same``
  compares a float64 checksum of them across ranks whenever the records are read);
* ``agree`` is the first collective: every rank has checked its arguments (the same checks
  everywhere); a rank that refused them or was given different settings or sentences than
  rank 0 makes every rank raise, naming the rank, instead of one rank exiting while its
  partners wait;
* with FSDP2 (``shard_model``) the decoder layers and the root are ``fully_shard``-ed; every
  rank then makes the same number of forwards per read (one forward per share for a training
  read; rounds of ``ROUND`` sentences, a throw-away forward where a rank has no sentences
  left, for a read without gradient), since each layer's forward and backward is a
  collective. The maps stay plain replicated tensors.

Set-up and faults (``launch``, ``rendezvous``, ``model_identity``): the launcher's environment
is checked before anything else (a partial set of RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT or
an invalid value is a ``LaunchError`` naming the variable); the group is created with every rank
having to reach the job's store within ``rendezvous_timeout`` seconds (the missing ranks, a
MASTER_PORT in use, an unreachable MASTER_ADDR:MASTER_PORT named), and collectives time out after
``timeout`` seconds, so a rank that died, stopped or wedged makes the others raise, naming it,
instead of hanging. ``agree`` also compares the ranks' models (names, shapes, dtypes and a sample
of the weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Sequence

import torch
import torch.distributed as dist

from lineas_fast.checks import ArgumentError
from lineas_fast.pooling import masked_mean, pad_right
from lineas_fast.training import rendezvous
from lineas_fast.training.launch import LAUNCH_VARIABLES, DistributedError, read_launch
from lineas_fast.training.model_identity import SAMPLES, model_identity

#: seconds a collective waits for its partners before raising
DEFAULT_TIMEOUT = 600.0
#: seconds every rank has to reach the job's store when the group is created
DEFAULT_RENDEZVOUS_TIMEOUT = 120.0
#: sentences per forward of a read without gradient under FSDP
ROUND = 64


@contextlib.contextmanager
def collective(what: str):
    """A collective whose failure (a partner rank that exited, crashed or did not arrive within
    the timeout) is a DistributedError saying which collective and which rank saw it, and, when
    this module created the group, which ranks did not report a failure of their own (stopped,
    wedged or gone; ``rendezvous.after_failure``)."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as error:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        timeout = rendezvous.job_timeout()
        within = f" of {timeout:g} s" if timeout else ""
        absent = rendezvous.after_failure()
        raise DistributedError(
            f"the {what} collective failed on rank {rank} of {world}: another rank exited, failed or "
            f"did not arrive within the collective timeout{within} ({rendezvous.TIMEOUT_KNOB})"
            f"{absent}: {_first_line(error)}"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < float("inf")):
        raise ArgumentError(f"{name} must be a positive number of seconds, got {value!r}", name)
    return float(value)


def launched() -> bool:
    """True when this process was started by torchrun (or an equivalent launcher) for a job
    of more than one process; a partial or invalid launcher environment raises LaunchError."""
    launch = read_launch()
    return launch is not None and launch.world_size > 1


def start(
    timeout: float = DEFAULT_TIMEOUT,
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT,
    fsdp: bool = False,
):
    """Create the job's process group from the launcher's environment, unless one exists or
    this is a single process; returns the ``launch.Launch`` (None for a single process).

    Call it first in a script (before loading the model) so that every rank meets the others
    within ``rendezvous_timeout`` s of its start; ``lf.train`` calls it itself otherwise. A
    partial or invalid environment raises LaunchError (naming the variable); a missing rank, a
    MASTER_PORT in use or an unreachable store raise DistributedError within
    ``rendezvous_timeout`` s; collectives time out after ``timeout`` s (see ``rendezvous``). A
    job of one process (WORLD_SIZE=1) gets a group only for ``fsdp``."""
    timeout = _positive(timeout, "timeout")
    rendezvous_timeout = _positive(rendezvous_timeout, "rendezvous_timeout")
    launch = read_launch()
    if dist.is_available() and dist.is_initialized():
        return launch
    if launch is None or (launch.world_size == 1 and not fsdp):
        return None
    rendezvous.start_group(launch, timeout, rendezvous_timeout)
    return launch


def setup(
    distributed: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    fsdp: bool = False,
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT,
):
    """The run's ``Ranks``, or None for a single process.

    ``distributed``: None (default) uses the initialised process group, or creates one from the
    launcher's environment when present (``start``: NCCL for CUDA tensors when CUDA is
    available, the device set from ``LOCAL_RANK``; gloo for CPU tensors; every rank must arrive
    within ``rendezvous_timeout`` s, collectives time out after ``timeout`` s); False: a single
    process even inside a group; True: as None, but raise when there is no group and no
    launcher environment. A group of one process gives None unless ``fsdp``."""
    if distributed not in (None, True, False):
        raise ArgumentError(f"distributed must be None, True or False, got {distributed!r}", "distributed")
    if fsdp not in (True, False):
        raise ArgumentError(f"fsdp must be True or False, got {fsdp!r}", "fsdp")
    if distributed is False:
        if fsdp:
            raise ArgumentError("fsdp=True needs distributed training (distributed=False given)", "fsdp")
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if start(timeout, rendezvous_timeout, fsdp) is None:
            if distributed or fsdp:
                what = "fsdp=True" if fsdp else "distributed=True"
                raise ArgumentError(
                    f"{what}: no torch.distributed process group is initialised and this process "
                    f"was not started by torchrun for several processes ({', '.join(LAUNCH_VARIABLES)} "
                    f"unset, or WORLD_SIZE=1)",
                    "fsdp" if fsdp else "distributed",
                )
            return None
    else:
        _positive(timeout, "timeout")
        _positive(rendezvous_timeout, "rendezvous_timeout")
    if dist.get_world_size() == 1 and not fsdp:
        return None
    return Ranks(fsdp=fsdp)


class Ranks:
    """This process's place in the run: ``rank``, ``world_size``, ``fsdp``, and the run's
    collectives (see the module docstring)."""

    def __init__(self, fsdp: bool = False, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.fsdp = bool(fsdp)
        self.main = self.rank == 0
        self.backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    # --- who reads what --------------------------------------------------------------------
    def sizes(self, n: int) -> list[int]:
        """Rows of a global batch of ``n`` that each rank reads (contiguous, in rank order)."""
        q, r = divmod(int(n), self.world_size)
        return [q + (1 if k < r else 0) for k in range(self.world_size)]

    def share(self, idx: Sequence[int]) -> list[int]:
        """This rank's contiguous share of the global batch ``idx``."""
        sizes = self.sizes(len(idx))
        start = sum(sizes[: self.rank])
        return list(idx[start : start + sizes[self.rank]])

    def check_counts(self, *counts: tuple[str, int, str]) -> None:
        """Every global batch has at least one row per rank (an empty share cannot be read);
        the same check on every rank, before any collective. ``counts``: (argument, n, noun)
        per thing read in shares, e.g. ("source", 1, "source sentence") or
        ("batch_size", 1, "") -- the argument the user gave, named in the error."""
        for argument, n, noun in counts:
            w = self.world_size
            if n >= w:
                continue
            if argument == "batch_size":
                raise ArgumentError(
                    f"batch_size={n} is smaller than the number of processes (WORLD_SIZE={w}): every "
                    f"rank reads at least one sentence of each batch; use batch_size >= {w} or fewer "
                    f"processes",
                    argument,
                )
            raise ArgumentError(
                f"{n} {noun}{'' if n == 1 else 's'} for {w} processes (WORLD_SIZE={w}): every rank "
                f"reads at least one {noun} of each batch; give at least {w} {noun}s or run fewer "
                f"processes",
                argument,
            )

    # --- collectives -------------------------------------------------------------------------
    def gather(self, parts: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
        """Each (sizes[rank], d_i) tensor of ``parts`` gathered over the ranks into the
        (Σ sizes, d_i) rows of the global batch, in one collective; gradients flow back to this
        rank's rows only (see the module docstring)."""
        dims = [p.shape[1] for p in parts]
        joined = parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)
        full = _GatherRows.apply(joined, tuple(int(s) for s in sizes), self.rank, self.group)
        return list(full.split(dims, 1)) if len(parts) > 1 else [full]

    def read(self, target, encoded, names: Sequence[str], idx: Sequence[int] | None = None) -> dict:
        """``target.pooled(encoded, names, idx)`` over the ranks: this rank reads its share of
        ``idx`` (default: every sample), the rows are gathered into (len(idx), d) per module on
        every rank, in ``idx``'s order. Gradients flow when grad is enabled."""
        idx = list(range(target.count(encoded))) if idx is None else list(idx)
        sizes = self.sizes(len(idx))
        mine = self.share(idx)
        if not self.fsdp:
            acts = target.pooled(encoded, names, mine, stop=True)
        else:
            with self.sharded("forward (FSDP weight all-gathers)"):
                acts = self._read_lockstep(target, encoded, names, mine, sizes, idx[0])
        names = list(names)
        dev = acts[names[0]].device
        gathered = self.gather([acts[m].to(dev) for m in names], sizes)
        return dict(zip(names, gathered))

    def _read_lockstep(self, target, encoded, names, mine, sizes, spare: int) -> dict:
        """Under FSDP: one forward for a read with gradient; otherwise ⌈max share / ROUND⌉
        forwards on every rank, a rank with nothing left reading sample ``spare`` and
        throwing it away."""
        if torch.is_grad_enabled():
            return target.pooled(encoded, names, mine, stop=True)
        pieces = []
        for start in range(0, max(sizes), ROUND):
            part = mine[start : start + ROUND]
            got = target.pooled(encoded, names, part or [spare], stop=True)
            if part:
                pieces.append(got)
        return {m: torch.cat([p[m] for p in pieces]) for m in names}

    def sharded(self, what: str):
        """``collective(what)`` around a block whose collectives are FSDP's own (the sharded
        model's forward or backward); no collective there without FSDP (a no-op context)."""
        return collective(what) if self.fsdp else contextlib.nullcontext()

    def reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks, in place (one ``all_reduce``)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with collective("all_reduce (map gradients)"):
            dist.all_reduce(flat, group=self.group)
        start = 0
        for p, g in zip(params, grads):
            chunk = flat[start : start + g.numel()].view_as(g)
            start += g.numel()
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)

    def check_same(self, params: Sequence[torch.Tensor], step: int) -> None:
        """Raise DistributedError when the maps differ between ranks after ``step`` steps: a
        float64 (Σ v, Σ k·v) checksum over every parameter, compared exactly with rank 0's (the
        ranks apply the same summed gradient, so they hold the same bits)."""
        with torch.no_grad():
            sums = []
            for p in params:
                v = p.detach().reshape(-1).double()
                k = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64)
                sums.append(torch.stack([v.sum(), (v * k).sum()]))
            local = torch.stack([s.to(self.device) for s in sums]).sum(0)
            every = [torch.empty_like(local) for _ in range(self.world_size)]
            with collective("all_gather (map checksums)"):
                dist.all_gather(every, local, group=self.group)
            values = torch.stack(every).cpu()
        differ = [r for r in range(self.world_size) if not torch.equal(values[r], values[0])]
        if differ:
            raise DistributedError(
                f"the maps differ between ranks after step {step}: ranks {differ} disagree with "
                f"rank 0 (checksums {values[differ[0]].tolist()} vs {values[0].tolist()}); the "
                f"ranks no longer train the same maps"
            )

    def agree(self, error: BaseException | None, digest: str, model: tuple | None = None) -> None:
        """The run's first collective: every rank reports whether it accepted its arguments, a
        digest of them and its model's identity (``model_identity``: structure, values). A rank
        that refused re-raises its own error; the others raise a DistributedError naming it;
        ranks whose digest, model structure or weight values differ from rank 0's are named
        (the values of a rank whose model is on the meta device are not compared: under FSDP it
        receives rank 0's weights)."""
        mine = (None if error is None else f"{type(error).__name__}: {error}", digest, model)
        every: list = [None] * self.world_size
        with collective("all_gather_object (argument agreement)"):
            dist.all_gather_object(every, mine, group=self.group)
        if error is not None:
            raise error
        failed = [(r, msg) for r, (msg, _, _) in enumerate(every) if msg is not None]
        if failed:
            r, msg = failed[0]
            raise DistributedError(f"rank {r} refused its arguments, so the run stops on every rank: {msg}")
        differ = [r for r, (_, d, _) in enumerate(every) if d != every[0][1]]
        if differ:
            raise DistributedError(
                f"ranks {differ} were given different settings, modules or sentences than rank 0 "
                f"(every rank must be started with the same arguments and data)"
            )
        _same_model([m for _, _, m in every])

    def any_flag(self, value: int) -> int:
        """The largest of the ranks' ``value`` (e.g. a pending signal number; 0 for none)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        with collective("all_reduce (signal flag)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            return int(t.item())

    def describe(self) -> dict:
        """What the steering's metadata records about the run's processes."""
        return {"world_size": self.world_size, "fsdp": self.fsdp}


def _same_model(models: list) -> None:
    """Raise DistributedError naming the ranks whose model differs from rank 0's (``agree``)."""
    if models[0] is None:
        return
    shape = [r for r, m in enumerate(models) if m is not None and m[0] != models[0][0]]
    if shape:
        raise DistributedError(
            f"ranks {shape} hold a model whose parameter names, shapes or dtypes differ from rank 0's: "
            f"every rank must load the same model in the same dtype"
        )
    if models[0][1] is None:
        return
    values = [r for r, m in enumerate(models) if m is not None and m[1] is not None and m[1] != models[0][1]]
    if values:
        raise DistributedError(
            f"ranks {values} hold other weights than rank 0 (same parameter names, shapes and dtypes, but a "
            f"sample of {SAMPLES} values of each parameter differs): every rank must load the same "
            f"checkpoint (a stale or different copy on one node?)"
        )


class Agreement:
    """What ``agreed`` compares across ranks: set ``digest`` at the end of the checked block,
    and ``model`` to the module tree whose weights every rank must share."""

    digest = ""
    model = None


@contextlib.contextmanager
def agreed(ranks: Ranks | None):
    """A block of argument checks that ends in ``Ranks.agree``: an exception inside is reported
    to the other ranks (and re-raised here); otherwise the block's ``digest`` is compared. A
    single process (``ranks`` None) just runs the block."""
    box = Agreement()
    if ranks is None:
        yield box
        return
    try:
        yield box
        model = model_identity(box.model) if box.model is not None else None
    except Exception as error:
        ranks.agree(error, "")
        raise
    ranks.agree(None, box.digest, model)


def is_main() -> bool:
    """True in a single process and on rank 0 of a process group: the process that writes.
    Without a group, the launcher's RANK decides (a partial or invalid launcher environment
    raises LaunchError rather than guessing)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    launch = read_launch()
    return launch is None or launch.rank == 0


def finish() -> None:
    """Leave the process group, if there is one (after the last collective, or on the way out
    after a failure, so that nothing of it outlives the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    rendezvous.forget()


def describe(ranks: Ranks | None) -> dict:
    return ranks.describe() if ranks is not None else {"world_size": 1, "fsdp": False}


def settings_digest(*parts) -> str:
    """sha256 of JSON-able parts (settings, module names, text lists) for ``Ranks.agree``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _GatherRows(torch.autograd.Function):
    """all_gather of (k_r, d) row blocks of different sizes (padded to the largest); backward:
    this rank's rows of the gradient (every rank computes the same loss from the gathered
    rows, so no reduction and no 1/N)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank = sizes, rank
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in sizes]
        with collective("all_gather (pooled activations)"):
            dist.all_gather(out, padded, group=group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


# --- FSDP2 -------------------------------------------------------------------------------------
def decoder_layers(model) -> list:
    """The decoder layers of a transformers causal LM (the ``nn.ModuleList`` the model's
    ``_no_split_modules`` classes live in, or ``model.model.layers`` / ``transformer.h``)."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in kinds]
    if found:
        return found
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    return []


def shard_model(target) -> None:
    """``fully_shard`` each decoder layer, then the root, of a language-model target's frozen
    model, and make every read of it one forward per call (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    if getattr(target, "kind", None) != "language_model":
        raise ArgumentError(
            f"fsdp=True shards a causal language model; got a {getattr(target, 'kind', type(target))}",
            "fsdp",
        )
    root = target.root
    layers = decoder_layers(root)
    if not layers:
        raise ArgumentError(
            f"fsdp=True: found no decoder layers in {type(root).__name__} to shard "
            f"(no _no_split_modules, model.layers or transformer.h)",
            "fsdp",
        )
    for p in root.parameters():
        p.requires_grad_(False)
    on_meta = _weights_on_meta(root)
    full = root.state_dict() if dist.get_rank() == 0 and on_meta else None
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    if on_meta:
        _fill_from_rank0(root, full)
    target.packing = False
    target.batches = _one_forward(target)


def _weights_on_meta(root) -> bool:
    """Whether ranks other than 0 built the model on the meta device (weights to come from
    rank 0, which must hold them all): one collective, the same answer on every rank. The
    ranks' parameter names, shapes and dtypes must be rank 0's."""
    names = [(n, tuple(p.shape), str(p.dtype)) for n, p in root.named_parameters()]
    meta = [n for n, p in root.named_parameters() if p.is_meta]
    mine = (len(meta), len(names), meta[:1], settings_digest(names))
    every: list = [None] * dist.get_world_size()
    with collective("all_gather_object (where the weights are)"):
        dist.all_gather_object(every, mine)
    if every[0][0]:
        raise DistributedError(
            f"fsdp=True: rank 0 holds {every[0][0]} of its {every[0][1]} parameters on the meta "
            f"device (e.g. {every[0][2][0]!r}); rank 0 must load the model's weights, the other ranks "
            f"may build it on the meta device and receive their shards from rank 0"
        )
    differ = [r for r, e in enumerate(every) if e[3] != every[0][3]]
    if differ:
        raise DistributedError(
            f"fsdp=True: ranks {differ} built a model whose parameter names, shapes or dtypes differ "
            f"from rank 0's (build it from the same config and dtype on every rank)"
        )
    partial = [r for r, e in enumerate(every) if 0 < e[0] < e[1]]
    if partial:
        raise DistributedError(
            f"fsdp=True: ranks {partial} hold some of their parameters on the meta device and some "
            f"not; build the whole model on the meta device (weights from rank 0) or load it whole"
        )
    return any(e[0] for e in every)


def _fill_from_rank0(root, full: dict | None) -> None:
    """After ``fully_shard``: the ranks whose model is on the meta device allocate their shards
    (``to_empty``) and every rank takes its shard of rank 0's ``full`` state dict
    (``set_model_state_dict`` with ``broadcast_from_rank0``, one tensor at a time); buffers,
    which FSDP leaves whole and which state dicts may omit (rotary ``inv_freq``), are broadcast
    from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = _shard_device()
    if any(p.is_meta for p in root.parameters()) or any(b.is_meta for b in root.buffers()):
        root.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    with collective("broadcast (weights from rank 0)"):
        set_model_state_dict(root, full if full is not None else {}, options=options)
        for buf in root.buffers():
            dist.broadcast(buf, src=0)


def _shard_device() -> torch.device:
    """The device ``fully_shard``'s default mesh puts the shards on (this rank's GPU, or the CPU)."""
    if torch.cuda.is_available() and dist.get_backend() != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _one_forward(target):
    """``batches`` that reads every requested sentence in one right-padded forward."""

    def batches(encoded, idx):
        ids, mask = pad_right([encoded[i] for i in idx], target.pad_id)
        ids, mask = ids.to(target.device), mask.to(target.device)
        yield (
            list(range(len(idx))),
            lambda: target.root(input_ids=ids, attention_mask=mask, use_cache=False),
            lambda h: masked_mean(h, mask),
        )

    return batches
