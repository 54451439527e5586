"""Atomic writes: every output (a file or a folder) is written under a temporary name beside its
destination and moved into place only when complete, so a reader always finds the old complete
output or the new complete one, never a half-written one, including when an existing output is
overwritten.

* **Files** (``atomic_path``): written to a temporary file, fsync'ed, then ``os.replace``d over
  the destination: one atomic rename.
* **Folders** (``atomic_dir``, used by ``lineas-fast fuse``): written to a temporary folder,
  then swapped with the existing one in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux, on
  ext4, xfs, btrfs, tmpfs, ...), after which the old folder is deleted. Where the exchange is
  not supported the swap is two renames (old folder to a backup name, new folder into place);
  if the process dies between them, the destination is briefly absent and the old complete
  folder waits under the backup name: the next write to that destination (or ``recover(path)``)
  moves it back before doing anything else.
* **Temporary names** are ``.lineas-tmp-<host>-<pid>-<random>-<name>`` (``<host>``: 6 hex
  digits of the hostname's sha256; backups ``.lineas-old-...``) in the destination's folder.
  A ``<name>`` too long to fit the filesystem's file-name limit (NAME_MAX, 255 bytes on Linux)
  with that prefix becomes ``sha256-<24 hex digits><suffix>``: the temporary keeps the
  destination's suffix (``.pt``, ``.safetensors``; writers such as ``torch.save`` read it) and
  fits the limit. A destination whose own name exceeds the limit is refused before anything
  is written (``OSError`` ENAMETOOLONG, ``name_too_long``).
  They are removed when the write fails (any exception, Ctrl-C) and on SIGTERM (the process
  still dies by the signal; this needs SIGTERM left at its default in the main thread: a
  handler of the program's own decides itself, and an exception it raises still cleans up).
  A swap that has begun is completed before Ctrl-C or SIGTERM is acted on. A write killed
  by SIGKILL (or a power loss) cannot clean up: the next write into the same folder removes
  every temporary whose writer, on this host, is gone (pid not running, or reused by a process
  started after the temporary was made), and restores or removes the backup of its own
  destination. Temporaries of live writers and of other hosts are never touched.

Test hook (the only one): with ``LINEAS_FAST_TEST_PAUSE_AT=<stage>`` in the environment, a write
prints ``lineas_fast: paused at <stage>`` to stderr and sleeps when it reaches that stage, so a
test can kill it exactly there. Stages: ``written`` (temporary complete, destination untouched),
``moved-aside`` (fallback swap only: old folder at its backup name, new not yet in place),
``swapped`` (new output in place, old folder not yet deleted).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

TMP_PREFIX = ".lineas-tmp-"
OLD_PREFIX = ".lineas-old-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_ENTRY = re.compile(r"^\.lineas-(tmp|old)-([0-9a-f]{6})-(\d+)-([0-9a-f]{8})-(.*)$", re.S)
_MAX_NAME = 180  # at most this many bytes of the destination name kept in a temporary's name
# bytes of a temporary's name before the destination's: prefix, host, the longest pid (pid_max is
# at most 2**22, 7 digits), the random part and the dashes
_HEAD = len(TMP_PREFIX) + 6 + 7 + 8 + 3
_MAX_SUFFIX = 32  # a longer "suffix" is not one a writer reads: a hashed name drops it
_SLACK = 10.0  # seconds of clock uncertainty when comparing start times


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp and
    mkdtemp create 0600/0700, which would make shared checkpoints unreadable to others)."""
    return (0o777 if directory else 0o666) & ~_umask()


# --- test hook ------------------------------------------------------------------------------
def _pause(stage: str) -> None:
    """Test-only: sleep at ``stage`` when LINEAS_FAST_TEST_PAUSE_AT names it (see module doc)."""
    if os.environ.get("LINEAS_FAST_TEST_PAUSE_AT") == stage:
        print(f"lineas_fast: paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)


# --- SIGINT / SIGTERM: clean temporaries, never interrupt a swap half-way ---------------------
_live: dict[str, None] = {}  # this process's temporaries, removed on SIGTERM
_state = {"depth": 0, "critical": 0, "pending": None, "installed": {}}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.remove(path)


def _deliver(signum: int) -> None:
    """Act on a signal as its default would, after removing this process's temporaries."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    for path in list(_live):
        _remove(path)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the default action kills


def _on_signal(signum, frame) -> None:
    if _state["critical"]:
        _state["pending"] = signum  # acted on when the swap is complete
        return
    _deliver(signum)


@contextmanager
def _signal_guard():
    """While a write runs in the main thread, SIGINT / SIGTERM left at their defaults get a
    handler that cleans up (Ctrl-C still raises KeyboardInterrupt, SIGTERM still kills);
    handlers the program installed itself are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                signal.signal(signum, _on_signal)
                _state["installed"][signum] = default
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for signum, default in _state["installed"].items():
                if signal.getsignal(signum) is _on_signal:
                    signal.signal(signum, default)
            _state["installed"] = {}


@contextmanager
def _critical():
    """Signals that arrive inside are acted on at its end (only SIGKILL can split it). Python
    runs signal handlers in the main thread only, so another thread's swap is never split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        pending = _state["pending"]
        if not _state["critical"] and pending is not None:
            _state["pending"] = None
            _deliver(pending)


# --- temporary names and stale temporaries -----------------------------------------------------
def name_max(path: str) -> int:
    """The longest file name, in bytes, that the filesystem holding ``path`` (or its nearest
    existing folder) allows: NAME_MAX, 255 where the system does not say."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def name_too_long(path: str) -> str | None:
    """Why ``path`` can never be created because a name in it is too long (one of its file or
    folder names over ``name_max`` bytes), or None."""
    path = os.path.abspath(os.fspath(path))
    limit = name_max(os.path.dirname(path))
    for part in path.split(os.sep):
        size = len(os.fsencode(part))
        if size > limit:
            return (
                f"the name {part[:24]!r}... is {size} bytes, more than the {limit} bytes a file "
                f"or folder name may have on its filesystem (NAME_MAX)"
            )
    return None


def _name_key(name: str, folder: str) -> str:
    """The destination name as kept in temporary names in ``folder``: the name itself when the
    temporary's name fits the filesystem's limit, else ``sha256-<digest><suffix>`` (the suffix
    kept: ``torch.save`` refuses a file name without one)."""
    encoded = os.fsencode(name)
    if len(encoded) <= min(_MAX_NAME, name_max(folder) - _HEAD):
        return name
    suffix = os.path.splitext(name)[1]
    if len(os.fsencode(suffix)) > _MAX_SUFFIX:
        suffix = ""
    return "sha256-" + hashlib.sha256(encoded).hexdigest()[:24] + suffix


def _temp_name(prefix: str, name: str, folder: str) -> str:
    return f"{prefix}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}-{_name_key(name, folder)}"


# --- ownership: which temporaries this user's lineas_fast processes made -----------------------
def _registry() -> str:
    """The folder where each temporary's creation is recorded (one small file per temporary,
    named by the digest of its absolute path, holding that path): a stale entry is recovered
    only when its record is there, so a planted ``.lineas-*`` entry is never moved or deleted."""
    cache = os.environ.get("LINEAS_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lineas_fast"
    )
    return os.path.join(cache, "atomic-temporaries")


def _record_path(entry: str) -> str:
    return os.path.join(_registry(), hashlib.sha256(os.fsencode(os.path.abspath(entry))).hexdigest()[:32])


def _register(entry: str) -> None:
    """Record that this process made ``entry`` (best effort: an unwritable cache only means a
    killed write's temporary is left for the user to delete)."""
    with contextlib.suppress(OSError):
        os.makedirs(_registry(), mode=0o700, exist_ok=True)
        with open(_record_path(entry), "w") as f:
            f.write(os.path.abspath(entry))


def _unregister(entry: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(_record_path(entry))


def _registered(entry: str) -> bool:
    """True when a lineas_fast process of this user recorded making ``entry``."""
    try:
        with open(_record_path(entry)) as f:
            return f.read() == os.path.abspath(entry)
    except OSError:
        return False


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), None when unknown; -1 for a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return -1.0
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_gone(pid: int, made: float) -> bool:
    """True when the process that made a temporary at time ``made`` no longer runs (POSIX
    only: elsewhere a temporary is never judged stale)."""
    if os.name != "posix":
        return False
    if pid == os.getpid():  # ours, unless made before we started
        start = _start_time(pid)
        return start is not None and start > made + _SLACK
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    start = _start_time(pid)
    if start is None:
        return False
    return start < 0 or start > made + _SLACK  # zombie, or the pid was reused since


def _stale_entries(folder: str):
    """(kind, key, path) of this host's temporaries in ``folder`` whose writer is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        m = _ENTRY.match(entry)
        if not m or m.group(2) != _HOST:
            continue
        path = os.path.join(folder, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid() or not _registered(path):
            continue  # not made by this user's lineas_fast: never touched
        if _writer_gone(int(m.group(3)), max(st.st_mtime, st.st_ctime)):
            yield m.group(1), m.group(5), path


def recover(path: str) -> None:
    """Undo what killed writes left beside ``path``: a folder swap interrupted between its two
    renames gets its old folder back at ``path``; stale temporaries and backups in the folder
    are removed. Called by every write before it starts; cheap when there is nothing to do."""
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    key = _name_key(os.path.basename(path), folder)
    backups = []
    for kind, entry_key, entry in _stale_entries(folder):
        if kind == "tmp":
            _remove(entry)
            _unregister(entry)
        elif entry_key == key:
            backups.append(entry)
    for entry in sorted(backups, key=lambda p: os.lstat(p).st_ctime, reverse=True):
        _unregister(entry)
        if not os.path.lexists(path):
            try:
                os.rename(entry, path)  # the old complete output comes back
                continue
            except OSError:
                pass
        _remove(entry)


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync(os.path.join(root, f))
        _fsync(root)


def _prepare(path) -> tuple[str, str]:
    """(resolved destination, its folder). The output's own folder is created when missing; a
    symlink at the destination is written through only when it points into that same folder
    (a link into another folder, dangling or not, is refused: a save never lands, or creates
    folders, elsewhere)."""
    given = os.path.abspath(os.fspath(path))
    too_long = name_too_long(given)
    if too_long:
        raise OSError(errno.ENAMETOOLONG, f"cannot write {given!r}: {too_long}", given)
    folder = os.path.realpath(os.path.dirname(given))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {given!r}: its folder is a file", folder)
    if os.path.islink(given):
        target = os.path.realpath(given)
        if os.path.dirname(target) != folder:
            raise OSError(
                errno.ELOOP,
                f"refusing to write through the symlink {given!r}: it points to {target!r}, outside "
                f"the output's folder (remove the link, or write to the target itself)",
                given,
            )
    path = os.path.join(folder, os.path.basename(given))
    path = os.path.realpath(path)
    os.makedirs(folder, exist_ok=True)
    recover(path)
    return path, folder


def _write_error(e: BaseException, path: str, folder: str) -> OSError | None:
    """An OSError naming ``path`` for a failed write: writers that raise other types
    (safetensors' SafetensorError, torch.save's RuntimeError from its zip writer) are mapped
    to ENOSPC when the folder's disk is full; an OSError without a file name gets ``path``.
    None: not a write failure (re-raise as is)."""
    if isinstance(e, OSError):
        if e.filename is None and e.errno is not None:
            return OSError(e.errno, e.strerror or str(e), path)
        return None
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < 1 << 20 or "No space left" in str(e) or "ENOSPC" in str(e):
        return OSError(errno.ENOSPC, f"No space left on device while writing ({type(e).__name__}: {e})", path)
    return None


# --- the writers ------------------------------------------------------------------------------
@contextmanager
def _owned_temporary(tmp: str, path: str, folder: str):
    """The life of one temporary of a write to ``path``: recorded as ours (for SIGTERM cleanup
    and stale recovery), a failed write turned into an OSError naming ``path``
    (``_write_error``), and the temporary removed at the end whatever happened."""
    _live[tmp] = None
    _register(tmp)
    try:
        yield
    except BaseException as e:
        mapped = _write_error(e, path, folder)
        if mapped is not None:
            raise mapped from e
        raise
    finally:
        _remove(tmp)
        _live.pop(tmp, None)
        _unregister(tmp)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary file path beside ``path``; when the block succeeds it is fsync'ed and
    renamed over ``path`` in one step. On any error, Ctrl-C or SIGTERM it is removed and
    ``path`` is left as it was."""
    path, folder = _prepare(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write file {path!r}: it is an existing folder")
    with _signal_guard():
        tmp = os.path.join(folder, _temp_name(TMP_PREFIX, os.path.basename(path), folder))
        with _owned_temporary(tmp, path, folder):
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            yield tmp
            os.chmod(tmp, default_mode())
            _fsync(tmp)
            _pause("written")
            os.replace(tmp, path)
            _fsync(folder)


_RENAME_EXCHANGE = 2
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2, or None (not Linux, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system or
    the filesystem cannot."""

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


@contextmanager
def atomic_dir(path: str, exclusive: bool = False):
    """Yield a temporary folder beside ``path``; when the block succeeds its contents are
    fsync'ed and it replaces ``path`` (an absent or existing folder) so that ``path`` is at every
    moment the old complete folder or the new one (see the module doc for filesystems without
    an atomic exchange). On any error, Ctrl-C or SIGTERM the temporary is removed and ``path``
    is left as it was. ``exclusive``: ``path`` must not exist (or be an empty folder) when the
    write completes: of two concurrent writers to one new output, the second fails with
    FileExistsError instead of replacing the first's result."""
    path, folder = _prepare(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"cannot write folder {path!r}: a file of that name exists")
    name = os.path.basename(path)
    with _signal_guard():
        tmp = os.path.join(folder, _temp_name(TMP_PREFIX, name, folder))
        with _owned_temporary(tmp, path, folder):
            os.mkdir(tmp, 0o700)
            yield tmp
            os.chmod(tmp, default_mode(directory=True))
            _fsync_tree(tmp)
            _pause("written")
            if exclusive:
                _move_in_new(tmp, path)
            else:
                _swap_in(tmp, path, folder, name)
            _fsync(folder)
            _pause("swapped")


def _move_in_new(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path`` only if nothing (or an empty folder) is there: renameat2's
    RENAME_NOREPLACE where available, else rename, which fails onto a non-empty folder."""
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        os.rmdir(path)
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE) == 0:
            return

        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise FileExistsError(err, f"{os.strerror(err)}: another writer created it meanwhile", path)
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "another writer created it meanwhile", path)
    try:
        os.rename(tmp, path)
    except OSError as e:
        raise FileExistsError(errno.EEXIST, "another writer created it meanwhile", path) from e


def _swap_in(tmp: str, path: str, folder: str, name: str) -> None:
    """Put the complete folder ``tmp`` at ``path``; afterwards ``tmp`` holds the old folder (or
    nothing) and is the caller's to delete."""
    if os.path.isdir(path) and _exchange(tmp, path):
        return
    if not os.path.isdir(path) or not os.listdir(path):
        os.replace(tmp, path)  # nothing to keep (absent or empty): one atomic rename
        return
    backup = os.path.join(folder, _temp_name(OLD_PREFIX, name, folder))
    _live[backup] = None  # removed on SIGTERM only once the swap is complete
    _register(backup)
    try:
        with _critical():
            os.rename(path, backup)
            try:
                _pause("moved-aside")
                os.rename(tmp, path)
            except BaseException:
                os.rename(backup, path)  # put the old folder back
                raise
            os.rename(backup, tmp)  # the caller deletes the old folder
    finally:
        _live.pop(backup, None)
        if os.path.lexists(backup) and os.path.isdir(path):
            _remove(backup)
        if not os.path.lexists(backup):
            _unregister(backup)


def file_kind(path: str) -> str:
    """What a file that should be a torch checkpoint looks like from its first bytes: "empty",
    "safetensors" (an 8-byte header length then JSON), or "" (unknown or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return ""
    if not head:
        return "empty"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return ""
