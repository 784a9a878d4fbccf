"""One writer per run folder: an exclusive lock file that ``train`` and ``evaluate`` hold while
they write into ``<run>``.

Why: two ``train`` processes pointed at the same folder interleave their checkpoints and loss
logs, and the pruning of one deletes the other's in-flight temporary files (``checkpoint._prune``
assumes it is the only writer). The second writer must stop at once, with a message naming the
holder, instead.

How: ``<run>/.reclip.lock`` is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)`` and holds a JSON
line (pid, host, start time, command) for the refusal message. The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so a lock file left by a dead process is stale
by construction: the next writer takes it over and rewrites it. On a normal exit, an exception or
Ctrl-C the context manager unlocks and removes the file. Under DDP only rank 0 locks and the
outcome is broadcast, so every rank refuses together instead of waiting in a collective.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

LOCK_NAME = ".reclip.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (a warning says so)
    fcntl = None  # type: ignore[assignment]


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder's lock."""

    def __init__(self, message: str, holder: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.holder = holder or {}


def _holder_info(path: Path) -> Dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _refusal(run: Path, path: Path, command: str, info: Dict[str, Any]) -> RunFolderLocked:
    who = (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
           f"started {info.get('started', '?')})") if info else "another process (it has not written its details yet)"
    return RunFolderLocked(
        f"run folder {run} is in use: {who} holds its lock {path}. Only one process may write a run folder "
        f"at a time; wait for it to finish (or stop it), or {command} into another folder with "
        "--set output_dir=<new folder>.", info)


def _acquire(run: Path, command: str, lock_name: str = LOCK_NAME) -> int:
    """Lock ``run``'s lock file; returns the open descriptor. Raises :class:`RunFolderLocked`."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / lock_name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(run, path, command, _holder_info(path)) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited on may have removed the file between our open and our flock: then
        # we locked an unlinked inode that nobody else can see. Retry on the file now at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        os.ftruncate(fd, 0)  # a dead holder's details are stale: replace them
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        _release(run, fd, lock_name)
        raise
    return fd


def _release(run: Path, fd: int, lock_name: str = LOCK_NAME) -> None:
    # Remove the file while still holding the lock, so no one can lock it in between and lose it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run / lock_name)
    os.close(fd)  # closing the last descriptor drops the flock


def _process_group() -> Any:
    """``torch.distributed`` when a process group of several ranks is initialised, else None
    (torch is imported only when it already is: the CLI's error paths stay fast)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist


def _broadcast_refusal(message: Optional[str]) -> Optional[str]:
    """Under DDP: rank 0's outcome (None = locked fine) to every rank."""
    dist = _process_group()
    if dist is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def run_folder_lock(run: os.PathLike, command: str, lock_name: str = LOCK_NAME) -> Iterator[Optional[Path]]:
    """Hold ``<run>/<lock_name>`` (``.reclip.lock``) for the ``with`` block; yields the lock file
    (None where not locked).

    ``command`` names the holder in the refusal message (``"train"``, ``"evaluate"``); another
    ``lock_name`` guards one file of a shared folder instead of the whole folder. Raises
    :class:`RunFolderLocked` when a live process holds it. Under DDP only rank 0 takes the lock."""
    run = Path(run)
    group = _process_group()
    rank = group.get_rank() if group is not None else 0
    fd: Optional[int] = None
    refused: Optional[RunFolderLocked] = None
    if rank == 0 and fcntl is not None:
        try:
            fd = _acquire(run, command, lock_name)
        except RunFolderLocked as err:
            refused = err
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
            warnings.warn(f"the file system of {run} does not support locks ({err}): the run folder is not locked; "
                          "do not run two writers on it.", stacklevel=3)
    elif rank == 0:
        warnings.warn(f"this platform has no fcntl.flock: {run} is not locked; do not run two writers on it.",
                      stacklevel=3)
    try:
        message = _broadcast_refusal(str(refused) if refused is not None else None)
        if refused is not None:
            raise refused
        if message is not None:
            raise RunFolderLocked(message)
        yield run / lock_name if fd is not None else None
    finally:
        if fd is not None:
            _release(run, fd, lock_name)


__all__ = ("run_folder_lock", "RunFolderLocked", "LOCK_NAME")
