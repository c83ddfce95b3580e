"""Whether a process still runs, by PID (framework-free): for the files a process leaves behind it
(a run's OUT/.lock, a sweep's running trials, convert/export staging directories)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True
