"""Tracebacks at most once per exception kind per interval: a client that can trigger an error at will must not be
able to flood the log with it, and the first occurrence of each kind still reaches the log in full."""

from __future__ import annotations

import logging
import threading
import time


class TracebackThrottle:
    """`log(logger, message, error)`: the traceback of `error` when its type was not logged in the last
    `interval_s` seconds, else nothing (the call still answers the client). Thread-safe: decoder threads share it."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._last_logged: dict[type[BaseException], float] = {}
        self._suppressed: dict[type[BaseException], int] = {}
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, message: str, error: BaseException) -> bool:
        """True when it logged; the line says how many of that kind were left out since the last one."""
        kind = type(error)
        now = time.monotonic()
        with self._lock:
            last = self._last_logged.get(kind)
            if last is not None and now - last < self._interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last_logged[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        logger.warning(
            "%s (%s; %d more of this kind left out of the log since the last)", message, kind.__name__, suppressed,
            exc_info=error,
        )  # fmt: skip
        return True
