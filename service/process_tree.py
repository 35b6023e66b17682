"""Child processes that end with their parent."""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """In a child process: SIGTERM when its parent dies, even by SIGKILL, so no orphan keeps running (Linux; the
    parent is the thread that started the child, here always a process's main thread)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
