"""Files that fail half-way through a write: a full disk, or a process killed mid-write.

Shared by the ``disk_full`` fixture (conftest.py) and the subprocess that is killed while it
writes a checkpoint (test_faults.py); the subprocess imports this module before the library.
"""
from __future__ import annotations

import os
from typing import Any, Callable


class HalfWrite:
    """A file object whose every ``write`` writes half the bytes, flushes, then calls ``then(fh)``
    (which raises, or kills the process); everything else is the real file's."""

    def __init__(self, fh: Any, then: Callable[[Any], None]):
        self.fh, self.then = fh, then

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        self.then(self.fh)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def fdopen_failing(real_fdopen: Callable, name_part: str, then: Callable[[Any], None]) -> Callable:
    """An ``os.fdopen`` whose files with ``name_part`` in their name are :class:`HalfWrite`."""

    def fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        return HalfWrite(fh, then) if name_part in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) else fh

    return fdopen
