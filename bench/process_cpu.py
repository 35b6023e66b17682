"""CPU seconds a process and all its descendants have used, read from /proc (Linux; psutil is not a dependency)."""

import os
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/<pid>/stat fields after the ")" that ends the command name: utime, stime, cutime, cstime are fields 14-17
# of the whole line (proc(5)), so 11-14 of what follows the name (which may itself hold spaces or parentheses).
_TIMES = slice(11, 15)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every process below it (waited-for children included, through
    cutime/cstime). A process that exits while being read counts for what was read of it. Resolution: one clock tick
    (usually 10 ms), so measure over many requests."""
    ticks = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            children = [
                int(child)
                for task in Path(f"/proc/{current}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += sum(int(field) for field in stat.rsplit(")", 1)[1].split()[_TIMES])
        pending += children
    return ticks / _CLOCK_TICKS
