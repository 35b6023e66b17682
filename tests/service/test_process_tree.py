"""service.process_tree.end_with_parent: a child ends with its parent, also when the parent died before the child
asked to (the seconds a spawned child spends starting up)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from service.process_tree import end_with_parent

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux: PR_SET_PDEATHSIG")


def _child(pid_file: Path) -> None:
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").rename(pid_file)  # whole when it appears
    parent = multiprocessing.parent_process()
    assert parent is not None
    while os.getppid() == parent.pid:  # the parent dies before this child asks to end with it
        time.sleep(0.01)
    end_with_parent()
    time.sleep(60)  # an orphan would still be here


def _parent(pid_file: Path) -> None:
    multiprocessing.get_context("spawn").Process(target=_child, args=(pid_file,)).start()
    while not pid_file.exists():
        time.sleep(0.01)
    os._exit(0)  # no cleanup: as a SIGKILL would leave it


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_whose_parent_died_before_it_asked_ends_at_once(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = multiprocessing.get_context("spawn").Process(target=_parent, args=(pid_file,))
    parent.start()
    parent.join(60)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running(child)
    if alive:
        os.kill(child, 9)
    assert not alive, "the orphan kept running"
