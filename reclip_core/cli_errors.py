"""How the command line turns a fault into one ``error: ...`` line and an exit status.

Bad input (a malformed config, an unreadable weights file, a folder that cannot be written) exits
with status 2; a runtime fault whose message already says what to do (a full disk, a non-finite
loss) with status 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Tuple, Union

import yaml

READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def not_a_file(path: Union[str, os.PathLike]) -> str:
    """Why ``path`` cannot be read as a regular file, in words: "does not exist" would mislead for a
    folder or a named pipe given where a file is expected."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be inspected ({err.strerror})"
    for test, what in ((stat.S_ISDIR, "is a folder, not a file"), (stat.S_ISFIFO, "is a named pipe (FIFO), not a file"),
                       (stat.S_ISSOCK, "is a socket, not a file"), (stat.S_ISCHR, "is a character device, not a file"),
                       (stat.S_ISBLK, "is a block device, not a file")):
        if test(mode):
            return what
    return "is not a regular file"


def _written_path(filename: Optional[str]) -> str:
    """The path a user chose: an atomic write's hidden temporary file names its folder instead."""
    if not filename:
        return "the output"
    p = Path(filename)
    return str(p.parent) if p.name.startswith(".") and p.name.endswith(".tmp") else str(p)


class RunStopped(RuntimeError):
    """A run the pipeline stopped on purpose, with a message that says what to do (exit status 1);
    e.g. ``training.NonFiniteLossError``."""


def explain(err: BaseException) -> Optional[Tuple[int, str]]:
    """``(exit status, message)`` for a fault the user can fix, or None for a bug (re-raised)."""
    if isinstance(err, RunStopped):
        return 1, str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return 1, str(err)
    if isinstance(err, OSError) and err.errno in READ_ONLY:
        verb = "write" if err.errno == errno.EROFS else "access"
        return 2, (f"cannot {verb} {_written_path(err.filename)} ({err.strerror}): it is read-only or not yours. "
                   "Make it writable (or readable), or write elsewhere (--set output_dir=DIR for a run, --out PATH for "
                   "a file).")
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1} of {mark.name}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return 2, f"the config is not valid YAML: {problem}{where}. Fix the file (or pass a shipped config name)."
    if type(err).__name__ == "SafetensorError":
        return 2, (f"a .safetensors file cannot be read ({err}): it is truncated, corrupt or not a safetensors "
                   "file. Restore it from a copy, or rebuild it.")
    return None


__all__ = ("explain", "not_a_file", "READ_ONLY")
