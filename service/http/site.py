"""Starting and stopping an aiohttp application on the running event loop (the KServe HTTP port, /metrics)."""

import logging
import ssl

from aiohttp import web

logger = logging.getLogger(__name__)


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    grace_s: float,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Serves `app` on host:port (HTTPS with `ssl_context`); `runner.cleanup()` stops listening, then gives in-flight
    requests `grace_s` seconds. Raises OSError when the port cannot be bound. `reuse_port`: SO_REUSEPORT, for the
    frontend processes that share the port (service/multiprocess/)."""
    # access_log=None: a line per request would drown the server's log under load; failures are logged by the handlers.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace_s)
    await runner.setup()
    try:
        # Otherwise reuse_port=False: a second server on the same port fails to start instead of silently sharing it.
        await web.TCPSite(runner, host, port, reuse_port=reuse_port, ssl_context=ssl_context).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
