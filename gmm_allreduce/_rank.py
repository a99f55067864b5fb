"""For the processes that our CLIs and tests spawn as ranks."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """Makes the kernel kill this process when its parent dies (Linux; elsewhere nothing), so
    that a crashed launcher (a test process that segfaults, a killed benchmark) leaves no rank
    waiting in a collective forever."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
