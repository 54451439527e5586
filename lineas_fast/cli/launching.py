"""``lineas-fast train`` under torchrun: its flags, the checks that need no model, the job's
process group (created before the model is loaded) and the resume after a torchrun restart.

Order, on every rank: the launcher's environment and the flags that depend on it
(``check_launch``, inside the command's checks), the sentence counts against WORLD_SIZE
(``check_shares``), the checkpoint to resume after a restart (``restart_resume``), then the
group (``start_job``: every rank must arrive within ``--rendezvous-timeout`` seconds), and only
then the model. Every refusal is a CLIError (exit 2) naming the variable, flag, port or rank.
"""

from __future__ import annotations

import os

from lineas_fast.cli.argtypes import real
from lineas_fast.cli.errors import CLIError
from lineas_fast.training.distributed import (
    DEFAULT_RENDEZVOUS_TIMEOUT,
    DEFAULT_TIMEOUT,
    DistributedError,
    start,
)
from lineas_fast.training.launch import Launch, LaunchError, read_launch


def add_launch_arguments(parser) -> None:
    """``--timeout`` and ``--rendezvous-timeout`` (seconds; used under torchrun)."""
    parser.add_argument(
        "--timeout",
        type=real(0, low_open=True),
        default=DEFAULT_TIMEOUT,
        help="under torchrun: seconds a collective waits for the other processes before every "
        "process stops with an error naming the missing one (default: %(default)g)",
    )
    parser.add_argument(
        "--rendezvous-timeout",
        type=real(0, low_open=True),
        default=DEFAULT_RENDEZVOUS_TIMEOUT,
        help="under torchrun: seconds every process has to reach the job's store at start "
        "(MASTER_ADDR:MASTER_PORT) before the others stop naming it (default: %(default)g)",
    )


def check_launch(args, kind: str) -> Launch | None:
    """The launcher's environment (None: one process), refused when partial or invalid, and
    the flags that need (``--fsdp``) or exclude (``--pipeline``) a launcher."""
    try:
        launch = read_launch()
    except LaunchError as e:
        raise CLIError(str(e)) from None
    if args.fsdp and launch is None:
        raise CLIError(
            "--fsdp shards the model over the processes of a torchrun job, and this process was not "
            "started by one (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unset): run "
            "torchrun --nproc-per-node N --no-python lineas-fast train ... --fsdp, or drop --fsdp"
        )
    if kind == "pipeline" and launch is not None and launch.world_size > 1:
        raise CLIError(
            f"--pipeline {args.pipeline!r}: diffusers pipelines train in one process, and this is rank "
            f"{launch.rank} of WORLD_SIZE={launch.world_size}: run it without torchrun"
        )
    return launch


def check_shares(launch: Launch | None, source: list, target: list, batch_size: int) -> None:
    """Every rank reads at least one sentence of each batch: the counts the user gave (source
    and target sentences, --batch-size) against WORLD_SIZE, before the model is loaded."""
    if launch is None or launch.world_size == 1:
        return
    w = launch.world_size
    for flag, n, what in (("--source", len(source), "source"), ("--target", len(target), "target")):
        if n < w:
            raise CLIError(
                f"{flag}: {n} {what} sentence{'' if n == 1 else 's'} for WORLD_SIZE={w} processes: "
                f"every process reads at least one {what} sentence of each batch; give at least {w} "
                f"or run fewer processes"
            )
    if batch_size < w:
        raise CLIError(
            f"--batch-size {batch_size} is smaller than WORLD_SIZE={w}: every process reads at least one "
            f"sentence of each batch; give --batch-size >= {w} or run fewer processes"
        )


def restart_resume(args, launch: Launch | None) -> str | None:
    """The checkpoint to resume from: ``--resume``, or, after a torchrun restart
    (TORCHELASTIC_RESTART_COUNT > 0) of a run given ``--checkpoint`` and no ``--resume``, that
    checkpoint when it exists (the restarted job continues from its last checkpoint instead of
    starting over). Rank 0 says so on stdout."""
    if args.resume or not args.checkpoint or launch is None or launch.restart == 0:
        return args.resume
    if not os.path.isfile(args.checkpoint):
        return None
    if launch.rank == 0:
        print(f"restart {launch.restart}: resuming from {args.checkpoint}", flush=True)
    return args.checkpoint


def start_job(args, launch: Launch | None) -> None:
    """The job's process group, every rank arriving within ``--rendezvous-timeout`` s and
    collectives timing out after ``--timeout`` s (a no-op for one process)."""
    if launch is None:
        return
    try:
        start(args.timeout, args.rendezvous_timeout, fsdp=args.fsdp)
    except DistributedError as e:
        raise CLIError(str(e)) from None
