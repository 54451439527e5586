"""The launcher's environment: which process of how many this is, and where the job's store is.

torchrun (and ``accelerate launch``, which runs it) starts every worker with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, plus ``LOCAL_RANK`` and, from torchrun,
``TORCHELASTIC_RESTART_COUNT`` (0 for the first start of the group, k after its k-th restart)
and ``TORCHELASTIC_USE_AGENT_STORE`` (``True``: torchrun's agent already serves the job's
key-value store at MASTER_ADDR:MASTER_PORT; otherwise rank 0 serves it there).

``read_launch`` reads and checks them, with no network access and no torch.distributed call, so
a command can refuse a broken environment before it loads a model: none of the four set is a
single process (None); some but not all set, a value that is not a whole number, a rank outside
``[0, WORLD_SIZE)``, a port outside 1..65535 or an empty address raise ``LaunchError`` naming
the variable and its value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from lineas_fast.checks import ArgumentError

#: the variables every torchrun / accelerate worker gets; all four or none
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Ranks of one run disagree (arguments, sentences, model, maps), one of them failed or did
    not arrive, or the job's process group could not be set up. Exported as
    ``lineas_fast.training.distributed.DistributedError``."""


class LaunchError(ArgumentError):
    """The launcher's environment is incomplete or holds an invalid value; ``argument`` names
    the environment variable."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job (see the module docstring)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT
    agent_store: bool = False  # torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT

    @property
    def address(self) -> str:
        """``MASTER_ADDR:MASTER_PORT``, as messages show it."""
        return f"{self.master_addr}:{self.master_port}"


def read_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launched job this process belongs to, from ``environ`` (default ``os.environ``);
    None when none of ``LAUNCH_VARIABLES`` is set. Raises ``LaunchError`` naming the variable
    for a partial set or an invalid value."""
    env = os.environ if environ is None else environ
    given = [k for k in LAUNCH_VARIABLES if k in env]
    if not given:
        return None
    missing = [k for k in LAUNCH_VARIABLES if k not in env]
    if missing:
        shown = ", ".join(f"{k}={env[k]!r}" for k in given)
        raise LaunchError(
            f"{shown} {'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: a launcher (torchrun) sets all of "
            f"{', '.join(LAUNCH_VARIABLES)}; unset {', '.join(given)} to run one process, or start "
            f"the job with torchrun",
            missing[0],
        )
    world = _whole(env, "WORLD_SIZE", low=1, what="the number of processes")
    rank = _whole(env, "RANK", low=0, what="this process's rank")
    if rank >= world:
        raise LaunchError(
            f"RANK={rank} is not a rank of WORLD_SIZE={world} processes (ranks are 0..{world - 1})", "RANK"
        )
    addr = env["MASTER_ADDR"].strip()
    if not addr:
        raise LaunchError("MASTER_ADDR is empty: it must name rank 0's host", "MASTER_ADDR")
    port = _whole(env, "MASTER_PORT", low=1, what="a TCP port")
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1..65535)", "MASTER_PORT")
    local = _whole(env, "LOCAL_RANK", low=0, what="this process's rank on its node", default=0)
    restart = _whole(env, "TORCHELASTIC_RESTART_COUNT", low=0, what="torchrun's restart count", default=0)
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
    return Launch(rank, world, addr, port, local, restart, agent)


def _whole(env, name: str, low: int, what: str, default: int | None = None) -> int:
    """``env[name]`` as an int >= low (``default`` when unset), or a LaunchError naming it."""
    if name not in env and default is not None:
        return default
    text = env[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not a whole number ({what})", name) from None
    if value < low:
        raise LaunchError(f"{name}={value} must be >= {low} ({what})", name)
    return value
