"""Logging with the id of the request being served on every line ("-" outside requests)."""

import logging
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str, role: str = "") -> None:
    """Root logging to stderr at `level` ("DEBUG", "INFO", ...), each line tagged with the request id, and with
    `role` when given (the process's, beside other processes of the server: "engine", "frontend-0")."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    line_format = _FORMAT.replace("%(name)s", f"{role} %(name)s") if role else _FORMAT
    handler.setFormatter(logging.Formatter(line_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
