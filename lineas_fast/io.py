"""Atomic writes: a file is written beside its destination and renamed into place, so a
crash never leaves a half-written file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp and
    mkdtemp create 0600/0700, which would make shared checkpoints unreadable to others)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the destination's folder; rename it to ``path`` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
