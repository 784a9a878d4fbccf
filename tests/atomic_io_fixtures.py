"""Shared helpers for the atomic-write tests (test_atomic_io, test_faults): the previous content of
a file a failed write must leave untouched. The ``existing`` fixture that writes it is in conftest.py."""
from __future__ import annotations

import os

OLD = b"previous complete content\n" * 10


def assert_untouched(path):
    assert path.read_bytes() == OLD
    assert sorted(os.listdir(path.parent)) == [path.name], "temporary file left behind"
