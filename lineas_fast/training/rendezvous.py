"""The job's process group, created with bounded waits, and the ranks named when one is missing.

``start_group(launch, timeout, rendezvous_timeout)`` for a ``launch.Launch``:

1. **the store.** Under torchrun (``launch.agent_store``) every rank connects to the store that
   torchrun's agent serves at MASTER_ADDR:MASTER_PORT; otherwise rank 0 serves it there and the
   others connect. Connecting waits at most ``rendezvous_timeout`` seconds: TCPStore's own
   connect can wait without end on a port that another program holds (it waits for a reply that
   never comes), so it runs in a helper thread that is abandoned after the bound. A port rank 0
   cannot listen on is reported at once, naming MASTER_PORT.
2. **one key space per attempt.** Keys go under ``lineas_fast/attempt<TORCHELASTIC_RESTART_COUNT>/``:
   torchrun's agent keeps one store for the whole job, across ``--max-restarts`` restarts, and
   without the prefix the restarted group read gloo's addresses of the previous attempt's
   workers, which are gone (it failed or hung connecting to them).
3. **roll call.** Every rank writes ``arrived/<rank>`` (its host and pid) and waits, within the
   same bound, until all WORLD_SIZE ranks have; otherwise it raises naming the ranks that did
   not arrive.
4. ``init_process_group(backend, store=..., timeout=timeout)``: every collective then fails
   after ``timeout`` seconds instead of waiting without end.
5. **heartbeat.** A daemon thread of every rank writes ``beat/<rank>`` (a counter) every
   ``BEAT`` seconds. It runs while the main thread waits inside a collective (gloo and NCCL
   release the GIL there) and stops when the process is stopped (SIGSTOP) or gone. It is
   stopped and joined by ``forget`` and, for a group never finished, at interpreter exit
   (``atexit``): a daemon thread still inside the store's C++ call when the interpreter
   finalizes is ended by ``pthread_exit`` through a ``noexcept`` frame, which aborts the whole
   process ("terminate called without an active exception", exit -6) after its work is done.

``after_failure()``: called by a rank whose collective failed. It records the failure in the
store, waits up to ``GRACE`` seconds for the other ranks to record theirs, and reads the
heartbeats at both ends of that wait: a rank whose heartbeat did not move is named as stopped or
gone, a rank that beats but reported no failure as alive but elsewhere (wedged outside the
collective, or late), each with its host and pid. Rank 0, when it serves the store, then waits
(up to ``GRACE`` s) until the ranks that reported have read theirs, so that its exit does not
take the store away from them.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lineas_fast.training.launch import DistributedError, Launch

#: the flags and arguments that set the two bounds, as messages name them
RENDEZVOUS_KNOB = "rendezvous_timeout / --rendezvous-timeout"
TIMEOUT_KNOB = "timeout / --timeout"
#: seconds between two heartbeats of a rank
BEAT = 1.0
#: seconds a rank whose collective failed waits for the others' reports (and heartbeats)
GRACE = 5.0


@dataclass
class _Job:
    store: object
    launch: Launch
    timeout: float
    stop: threading.Event
    beat: threading.Thread
    failures: int = 0  # collective failures seen so far (each gets its own keys)


_JOB: _Job | None = None  # the group this module created, until ``forget``


def start_group(launch: Launch, timeout: float, rendezvous_timeout: float) -> None:
    """Create the default process group of ``launch`` (see the module docstring); raises
    DistributedError naming MASTER_ADDR:MASTER_PORT, MASTER_PORT or the missing ranks."""
    global _JOB
    store = dist.PrefixStore(f"lineas_fast/attempt{launch.restart}", _connect(launch, rendezvous_timeout))
    _roll_call(store, launch, rendezvous_timeout)
    backend = "gloo"
    if torch.cuda.is_available():  # CUDA tensors over NCCL, CPU tensors (a CPU model) over gloo
        torch.cuda.set_device(launch.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(
            backend,
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=float(timeout)),
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {launch.rank}: every rank reached the job's store at {launch.address}, but the "
            f"process group could not be created: {error}"
        ) from error
    stop = threading.Event()
    store.set(f"beat/{launch.rank}", "0")
    beat = threading.Thread(target=_beat, args=(store, launch.rank, stop), daemon=True)
    beat.start()
    _JOB = _Job(store, launch, float(timeout), stop, beat)


def _beat(store, rank: int, stop: threading.Event) -> None:
    """This rank's heartbeat (module docstring, 5) until ``stop`` is set or the store is gone."""
    n = 0
    while not stop.wait(BEAT):
        n += 1
        try:
            store.set(f"beat/{rank}", str(n))
        except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell
            return


def forget() -> None:
    """The group this module created is gone (``distributed.finish``, and at interpreter exit):
    its heartbeat is stopped and joined (module docstring, 5). The join waits for at most one
    store call in flight, bounded by ``GRACE`` s should the store have gone."""
    global _JOB
    job, _JOB = _JOB, None
    if job is not None:
        job.stop.set()
        job.beat.join(GRACE)


atexit.register(forget)


def job_timeout() -> float | None:
    """The collective timeout of the group this module created (None: the group is not ours)."""
    return _JOB.timeout if _JOB is not None else None


def _connect(launch: Launch, bound: float):
    """A TCPStore client (or rank 0's server) at MASTER_ADDR:MASTER_PORT, within ``bound`` s."""
    serve = launch.rank == 0 and not launch.agent_store
    box: dict = {}

    def connect():
        try:
            if not serve:
                _wait_for_listener(launch, deadline)
            box["store"] = dist.TCPStore(
                launch.master_addr,
                launch.master_port,
                launch.world_size,
                serve,
                timeout=timedelta(seconds=bound),
                wait_for_workers=False,
            )
        except Exception as error:  # noqa: BLE001 - mapped to a message below
            box["error"] = error

    deadline = time.monotonic() + bound
    helper = threading.Thread(target=connect, name="lineas-fast-store-connect", daemon=True)
    helper.start()
    helper.join(bound)
    if "store" in box:
        return box["store"]
    error = box.get("error")
    text = str(error) if error is not None else ""
    if serve and ("EADDRINUSE" in text or "address already in use" in text.lower()):
        raise DistributedError(
            f"MASTER_PORT={launch.master_port} is in use on this host: rank 0 cannot serve the "
            f"job's store there (another program, or an earlier job still running, listens on it); "
            f"give every rank a free MASTER_PORT"
        )
    who = "torchrun's agent" if launch.agent_store else "rank 0"
    if serve:
        raise DistributedError(
            f"rank 0 could not serve the job's store at MASTER_ADDR:MASTER_PORT={launch.address} "
            f"within the rendezvous timeout of {bound:g} s ({RENDEZVOUS_KNOB}): {text or 'no answer'}"
        )
    raise DistributedError(
        f"rank {launch.rank} could not connect to the job's store at MASTER_ADDR:MASTER_PORT="
        f"{launch.address} within the rendezvous timeout of {bound:g} s ({RENDEZVOUS_KNOB}): "
        f"{who}, which serves it, has not started or has failed, MASTER_ADDR/MASTER_PORT are not "
        f"{who}'s, or another program holds that port" + (f" ({text.splitlines()[0]})" if text else "")
    )


def _wait_for_listener(launch: Launch, deadline: float) -> None:
    """Until ``deadline``: retry a plain TCP connection to MASTER_ADDR:MASTER_PORT until something
    listens there (quietly; TCPStore's own retries log a C++ stack trace each)."""
    delay = 0.05
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((launch.master_addr, launch.master_port), timeout=max(left, 0.01)):
                return
        except OSError as error:
            if time.monotonic() + delay >= deadline:
                raise DistributedError(f"nothing listens there ({error})") from None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _roll_call(store, launch: Launch, bound: float) -> None:
    """Every rank announces itself; wait until all have, at most ``bound`` s from now."""
    deadline = time.monotonic() + bound
    store.set(f"arrived/{launch.rank}", f"{socket.gethostname()} pid {os.getpid()}")
    store.add("arrived", 1)
    delay = 0.01
    while store.add("arrived", 0) < launch.world_size:
        if time.monotonic() >= deadline:
            absent = [r for r in range(launch.world_size) if not store.check([f"arrived/{r}"])]
            came = launch.world_size - len(absent)
            raise DistributedError(
                f"rank {launch.rank}: only {came} of WORLD_SIZE={launch.world_size} processes reached the "
                f"job's store at MASTER_ADDR:MASTER_PORT={launch.address} within the rendezvous timeout "
                f"of {bound:g} s ({RENDEZVOUS_KNOB}); rank(s) {_ranks(absent)} did not: not started, "
                f"failed before it, or started with another MASTER_ADDR, MASTER_PORT or WORLD_SIZE"
            )
        time.sleep(delay)
        delay = min(2 * delay, 0.25)


def after_failure() -> str:
    """After this rank's collective failed: which other ranks are stopped or gone, and which
    are alive but reported no failure within ``GRACE`` s (module docstring), as a clause for
    the error message; "" when the group is not this module's."""
    job = _JOB
    if job is None:
        return ""
    store, rank, world = job.store, job.launch.rank, job.launch.world_size
    key = f"failed{job.failures}"
    job.failures += 1
    others = [r for r in range(world) if r != rank]
    try:
        store.set_timeout(timedelta(seconds=GRACE))
        store.set(f"{key}/{rank}", "1")
        store.add(key, 1)
        before = [store.get(f"beat/{r}") for r in others]
        deadline = time.monotonic() + GRACE
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(max(0.0, min(deadline, time.monotonic() + 3 * BEAT) - time.monotonic()))
        after = [store.get(f"beat/{r}") for r in others]
        silent = [r for r in others if not store.check([f"{key}/{r}"])]
        where = {r: store.get(f"arrived/{r}").decode() for r in silent}
        store.add(f"{key}/read", 1)
        if rank == 0 and not job.launch.agent_store:  # this process serves the store: stay until
            until = time.monotonic() + GRACE  # the ranks that reported have read it
            while store.add(f"{key}/read", 0) < store.add(key, 0) and time.monotonic() < until:
                time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store itself is out of reach
        who = "torchrun's agent" if job.launch.agent_store else "rank 0"
        return (
            f"; the job's store did not answer within {GRACE:g} s, so which rank is missing is not "
            f"known ({who}, which serves the store, may be the one stopped or gone)"
        )
    still = {r for r, b, a in zip(others, before, after) if a == b}
    gone = [f"rank {r} ({where[r]})" for r in silent if r in still]
    late = [f"rank {r} ({where[r]})" for r in silent if r not in still]
    parts = []
    if gone:
        parts.append(f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} stopped or gone (no heartbeat)")
    if late:
        parts.append(
            f"{', '.join(late)} {'is' if len(late) == 1 else 'are'} alive but reported no failure within "
            f"{GRACE:g} s (wedged outside this collective, or late)"
        )
    return "; " + "; ".join(parts) if parts else "; every other rank saw this failure too"


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16])
    return shown + (f", ... ({len(ranks)} in all)" if len(ranks) > 16 else "")
