"""Output and input paths of the command line: an output can be written (a file or a folder,
under a writable folder, names within NAME_MAX, not standard output) and is never an input or
inside one (symlinks resolved, hard links compared by inode); an input file exists and can be
read. Every problem is a ``CLIError`` naming the flag, raised before a model is loaded."""

from __future__ import annotations

import os

from lineas_fast.atomic import name_too_long
from lineas_fast.cli.errors import CLIError


def _file_ids(folder: str, limit: int = 10000) -> set:
    """(device, inode) of the regular files under ``folder`` (at most ``limit`` entries seen)."""
    ids, seen = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            seen += 1
            if seen > limit:
                return ids
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
    return ids


def _overlap(out: str, value: str) -> str | None:
    """How output ``out`` would touch input ``value`` (a file or a folder): "is" (the same file or
    folder, symlinks resolved, or a hard link of it), "is inside" (under the input folder, or a
    hard link of one of its files), or None."""
    real_out, real_in = os.path.realpath(out), os.path.realpath(value)
    if real_out == real_in:
        return "is"
    if real_out.startswith(real_in.rstrip(os.sep) + os.sep):
        return "is inside"
    try:
        if os.path.isfile(out):
            st = os.stat(out)
            if os.path.isfile(value) and os.path.samefile(out, value):
                return "is"
            if os.path.isdir(value) and (st.st_dev, st.st_ino) in _file_ids(value):
                return "is inside"  # a hard link of one of the input folder's files
    except OSError:
        pass
    return None


def refuse_inputs(path: str, flag: str, inputs: dict | None) -> None:
    """An output ``path`` is none of the ``inputs`` ({flag: file or folder}) and lies under no
    input folder, by resolved path (symlinks followed, hard links compared by inode): an input is
    never an output."""
    for other, value in (inputs or {}).items():
        if not value:
            continue
        how = _overlap(path, value)
        if how:
            real = os.path.realpath(path)
            shown = "" if real == os.path.abspath(path) else f" (resolved: {real!r})"
            kind = "folder " if os.path.isdir(value) else ""
            raise CLIError(
                f"{flag} {path!r}{shown} {how} {other} {kind}{value!r}: an input is never written; "
                f"give {flag} a path outside the inputs"
            )


def _not_stdout(path: str, flag: str, what: str) -> None:
    if path == "-":
        raise CLIError(
            f"{flag} '-': this command writes a {what}, not to standard output; give a path "
            f"(./- for a file named '-')"
        )


def _writable_ancestor(path: str, flag: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process may write in
    (missing folders between are created when the output is written), and no name in ``path``
    is longer than its filesystem allows (NAME_MAX)."""
    too_long = name_too_long(path)
    if too_long:
        raise CLIError(f"{flag} {path!r} cannot be written: {too_long}; give a shorter name")
    p = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise CLIError(f"{flag} {path!r}: {p!r} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: cannot write in folder {p!r} (permission denied)")


def check_output_file(path: str, flag: str, inputs: dict | None = None, suffix: str | None = None) -> None:
    """``path`` can be written as a file: not a folder, under a writable folder, not one of the
    ``inputs`` ({flag: path}) and, when given, ending in ``suffix``."""
    if not path or not path.strip():
        raise CLIError(f"{flag}: expected a file path, got {path!r}")
    _not_stdout(path, flag, "file")
    refuse_inputs(path, flag, inputs)
    if path.endswith(os.sep) or os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; expected a file path")
    if suffix and not path.lower().endswith(suffix):
        raise CLIError(f"{flag} {path!r}: expected a file name ending in {suffix}")
    _writable_ancestor(path, flag)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} exists and is not a regular file")


def check_output_dir(
    path: str, flag: str, overwrite: bool | None = None, inputs: dict | None = None, inside: bool = False
) -> None:
    """``path`` can be written as a folder: not a file; when ``overwrite`` is False an existing
    folder must be empty; it is none of the ``inputs``, lies under none and holds none; its parent
    (``inside``: the folder itself when it exists) is writable."""
    if not path or not path.strip():
        raise CLIError(f"{flag}: expected a folder path, got {path!r}")
    _not_stdout(path, flag, "folder")
    refuse_inputs(path, flag, inputs)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a file; expected a folder")
    if os.path.ismount(path):
        raise CLIError(
            f"{flag} {path!r} is a mount point: a folder output is written beside it and swapped in, "
            f"which a mount point cannot be; write to a folder inside it"
        )
    if overwrite is False and os.path.isdir(path) and os.listdir(path):
        raise CLIError(f"{flag} folder {path!r} is not empty; pass --overwrite to replace it")
    real_out = os.path.realpath(path)
    for other, value in (inputs or {}).items():
        if value and (os.path.realpath(value) + os.sep).startswith(real_out + os.sep):
            raise CLIError(f"{flag} {path!r} holds {other} {value!r}: writing it would delete that input")
    if inside and os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {path!r}: cannot write in this folder (permission denied)")
    else:
        _writable_ancestor(path, flag)


def check_input_file(path: str, flag: str) -> None:
    if not path:
        raise CLIError(f"{flag}: expected a file path, got ''")
    if not os.path.exists(path):
        raise CLIError(f"{flag} file {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; expected a file")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} file {path!r} cannot be read (permission denied)")
