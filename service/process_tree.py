"""Child processes that end with their parent."""

import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """In a multiprocessing child: SIGTERM when its parent dies, even by SIGKILL, so no orphan keeps running (Linux;
    the parent is the thread that started the child, here always a process's main thread). A child starts its
    interpreter and imports before it gets here, which takes seconds: a parent that died meanwhile sends no signal,
    so the child sends itself the one it missed."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)
