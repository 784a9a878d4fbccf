"""When a download must give up: a server that trickles a byte every few seconds never trips the
socket timeout, so a download also has to finish — by ``--max-seconds`` (``$RECLIP_DOWNLOAD_MAX_SECONDS``)
when given, else at an average of :data:`MIN_RATE` bytes/s once :data:`RATE_GRACE_S` seconds have
passed. The part file is kept either way, so a rerun resumes."""
from __future__ import annotations

import os
import time
from typing import Optional

DEADLINE_ENV = "RECLIP_DOWNLOAD_MAX_SECONDS"  # what `python -m data_prep --max-seconds S` sets
MIN_RATE = 16 * 1024
RATE_GRACE_S = 60.0


def too_slow(url: str, started: float, got: int) -> Optional[str]:
    """Why the download of ``url`` (``got`` bytes since ``time.monotonic()`` was ``started``) must
    stop now, or None while it may go on."""
    elapsed = time.monotonic() - started
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if raw and elapsed > float(raw):
        return (f"{url}: not finished after {elapsed:.0f} s (limit --max-seconds {raw}; {got} bytes received); "
                "the part file is kept, run the command again to resume, or raise --max-seconds.")
    if not raw and elapsed > RATE_GRACE_S and got < MIN_RATE * elapsed:
        return (f"{url}: {got} bytes in {elapsed:.0f} s, below the minimum of {MIN_RATE // 1024} KiB/s; the part "
                "file is kept: run the command again later to resume, or give a time limit with --max-seconds S "
                "to wait longer.")
    return None


__all__ = ("too_slow", "DEADLINE_ENV", "MIN_RATE", "RATE_GRACE_S")
